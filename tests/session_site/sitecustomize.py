"""Imported at start-up by every Python process the tests start (conftest.py puts this
directory on their PYTHONPATH): every process of a multi-process JAX program on CPU shares
the session's persistent compilation cache (conftest.py), not only the first.

At jax 0.10.2 a cache entry is written by process 0 of a ``jax.distributed`` program alone
(jax/_src/compiler.py, ``_cache_write``: "Only write cache entries from the first process"),
and on CPU the key hashes a topology fingerprint that differs from process to process
(jax/_src/cache_key.py, ``_hash_accelerator_config``). So the student host of rank 1 of each
of the dozens of 2-host groups that the integration tests form compiled every step and every
initialiser again, and rank 0 waited for it at their first collective. Here each process
writes what it compiles, and the key hashes, instead of the fingerprint, each device of the
program with the process that holds it: the same in every process of the program, and
different for one process holding the same devices (--xla_force_host_platform_device_count).
A process that never imports jax is untouched, and so is any other jax version: its tests run
as before, compiling more.
"""

import importlib.abc
import importlib.machinery
import sys

VERIFIED_JAX = "0.10.2"


def _share_between_processes(compiler) -> None:
    from jax._src import cache_key, compilation_cache, config
    from jax.version import _version

    if _version != VERIFIED_JAX:
        return

    def write_from_every_process(key, compile_time_secs, module_name, backend, executable,
                                 host_callbacks):
        # _cache_write's own conditions, less the one on the process
        if host_callbacks or compile_time_secs < config.persistent_cache_min_compile_time_secs.value:
            return
        compilation_cache.put_executable_and_time(key, module_name, executable, backend,
                                                  int(compile_time_secs))

    def devices_and_their_processes(hash_obj, devices):
        for device in devices.flat:
            hash_obj.update(f"{device.id}/{device.process_index}/{device.device_kind};".encode())

    cache_key._hash_accelerator_config = devices_and_their_processes
    compiler._cache_write = write_from_every_process


class _AfterJaxCompiler(importlib.abc.MetaPathFinder):
    """Patches ``jax._src.compiler`` right after it is imported: importing jax here would run
    before a host actor sets its JAX environment (actors/hosts.py refuses that)."""

    def find_spec(self, name, path, target=None):
        if name != "jax._src.compiler":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        execute = spec.loader.exec_module

        def execute_then_patch(module):
            execute(module)
            _share_between_processes(module)

        spec.loader.exec_module = execute_then_patch
        return spec


sys.meta_path.insert(0, _AfterJaxCompiler())
