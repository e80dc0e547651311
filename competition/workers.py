"""Worker processes that never outlive the run that started them."""

import multiprocessing
import os
import threading
import time

_watchdog_started = False


def stop_when_orphaned(driver_pid: int, interval: float = 0.5) -> None:
    """Exit this worker process as soon as the process that started it is gone.

    Why: when ``train.py --folds`` or ``infer.py --devices`` is killed (kill -9, a notebook's kernel
    restart), its workers would go on writing into the run folder or the submission, unseen, and
    race a resumed run. Once per worker process (joblib reuses workers across tasks).
    """
    global _watchdog_started
    if _watchdog_started or os.getpid() == driver_pid:
        return
    _watchdog_started = True

    def watch():
        while os.getppid() == driver_pid:
            time.sleep(interval)
        os._exit(3)

    threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()


def die_with_parent() -> None:
    """``preexec_fn`` of a child process: the kernel kills it when the process that started it dies
    (Linux's PR_SET_PDEATHSIG), so a benchmark or command run by another never outlives it."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def loader_start_method(workers: int):
    """The context a DataLoader with ``workers`` processes starts them in: the platform's default, named, since
    inside a joblib worker (``train.py --folds ... --jobs``/``--gpus``) the default is loky's own, whose processes
    a DataLoader cannot start ("'Process' object has no attribute 'env'"). None without workers."""
    return multiprocessing.get_context(multiprocessing.get_all_start_methods()[0]) if workers else None
