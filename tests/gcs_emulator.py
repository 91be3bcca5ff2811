"""A local Cloud Storage for tests: gcp-storage-emulator, in memory, with the
object generation headers TensorStore's GCS driver reads.

  python tests/gcs_emulator.py PORT BUCKET

TensorStore (what orbax writes arrays with) takes an object's generation from
the `x-goog-generation` header of a media download; the emulator sends it only
in the JSON metadata, so downloads here get the header added. Nothing else of
the emulator is changed; gcsfs (etils.epath's gs://) uses it as is.
"""
import sys
import threading

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"],
                               request.params["object_id"])
  except Exception:  # not found: the response already says so
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = _download_with_generation

from gcp_storage_emulator.server import create_server  # noqa: E402  (after the patch)


def main(port: int, bucket: str) -> None:
  server = create_server("127.0.0.1", port, in_memory=True,
                         default_bucket=bucket)
  server.start()
  threading.Event().wait()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
