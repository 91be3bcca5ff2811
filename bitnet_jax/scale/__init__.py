"""Scale: device meshes and shardings, accelerator facts, compiled-program analysis, dry runs."""
