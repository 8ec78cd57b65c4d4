"""One ``onnxvq.compress`` run in its own process, so that its peak memory is its own.

Usage (run.py does this): ``python compress_worker.py JOB.json``. The job names the model, the
output file, the keyword settings, the finetune mode and an optional pickle of calibration feed
dicts (a list, passed as ``calib=`` exactly as a user of the Python API would). The worker writes
``JOB.json.result``: seconds spent in ``compress`` + ``save``, peak RSS (``VmHWM``; the RSS before
the call is reported too, to separate imports and calibration data from the work), the summary
totals and calibration quality, or the OnnxVQError message when onnxvq refused the setting.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
import traceback


def _vm(key: str) -> float:
    """A ``/proc/self/status`` memory line in MiB (Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    result: dict = {}
    try:
        import onnxvq

        calib = None
        if job.get("calib"):
            with open(job["calib"], "rb") as f:
                calib = pickle.load(f)
        result["rss_before_mib"] = _vm("VmRSS")
        start = time.perf_counter()
        try:
            # vq4all's universal codebook goes beside the model (a device stores it once): the
            # file ratio (and a size target) is the model's alone, the summary's totals carry
            # the codebook's bytes
            out = onnxvq.compress(job["model"], calib=calib, finetune=job.get("finetune"),
                                  codebook_external=job["settings"].get("method") == "vq4all", **job["settings"])
            out.save(job["out"])
        except onnxvq.OnnxVQError as e:
            result["skipped"] = f"OnnxVQError: {e}"
        result["compress_s"] = time.perf_counter() - start
        result["rss_peak_mib"] = _vm("VmHWM")
        if "skipped" not in result:
            summary = out.summary.to_dict()
            result["totals"] = summary.get("totals")
            result["calibration"] = summary.get("calibration")
            result["left_alone"] = len(summary.get("left_alone") or [])
    except Exception as e:  # noqa: BLE001 (reported in the table, the suite goes on)
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    with open(job_path + ".result", "w") as f:
        json.dump(result, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
