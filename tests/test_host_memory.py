import os
import platform
import subprocess
import sys

import pytest

CALL = "from plait.host_memory import keep_freed_memory as k; print(k(), k())"


def _run(env_extra: dict) -> str:
    env = {key: value for key, value in os.environ.items()
           if key not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CALL], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_keep_freed_memory_applies_once_and_leaves_users_settings_alone():
    assert _run({}) == "True True"
    assert _run({"MALLOC_TRIM_THRESHOLD_": "131072"}) == "False False"
