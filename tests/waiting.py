"""Polling for the runtime tests: processes change state asynchronously."""
import time


def wait_until(pred, timeout: float = 10.0, step: float = 0.01) -> bool:
    """Call ``pred`` until it is true or ``timeout`` seconds passed; its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
