"""``python -m conformance.engines.forked_serve <module> [arguments]``: run a vLLM server entry point with
its engine core forked from the server process and the workers from the engine core
(:func:`conformance.engines.zygote.install_fork`), instead of two more interpreters that import vLLM anew.

:class:`~conformance.engines.vllm_server.VllmServerEngine` starts CPU-tier servers this way unless
``PARITY_ENGINE_START=spawn``; the module runs as ``__main__`` with the arguments it would get from
``python -m <module> [arguments]``.
"""

from __future__ import annotations

import runpy
import sys

from conformance.engines import zygote


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m conformance.engines.forked_serve <module> [arguments]")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    print(f"conformance.engines.forked_serve: engine processes start by {zygote.install_fork()}", flush=True)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
