"""Server engine under bad conditions: a taken port, a malformed response, a server that dies mid-run;
no hang and no orphan process. Plus: weights reloaded through the dev endpoint really change the model."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from conformance.engines.base import EngineFailure, Request
from conformance.engines.vllm_server import VllmServerEngine, cli_flags, completion_body, group_members, parse_choice
from conformance.matrix import Cell
from conformance.spec import SamplingSpec

CELL = Cell(
    id="server-test",
    dtype="float32",
    logprobs_mode="processed_logprobs",
    engine="vllm-server",
    env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    start_timeout_s=240,
)
GREEDY = SamplingSpec(temperature=0.0, max_tokens=6, logprobs=2)


def test_cli_flags_and_request_body() -> None:
    flags = cli_flags(
        {
            "dtype": "float32",
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "hf_overrides": {"head_dtype": "float32"},
            "max_num_seqs": 4,
        }
    )
    assert flags == [
        "--dtype",
        "float32",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--hf-overrides",
        '{"head_dtype": "float32"}',
        "--max-num-seqs",
        "4",
    ]
    body = completion_body(Request((1, 2), SamplingSpec(logit_bias=((5, -1.5),), seed=3, top_k=7), prompt_logprobs=2))
    assert body["logit_bias"] == {"5": -1.5} and body["seed"] == 3 and body["top_k"] == 7
    assert body["prompt_logprobs"] == 2 and body["return_tokens_as_token_ids"] is True


def test_minus_9999_is_minus_inf() -> None:
    choice = {
        "index": 0,
        "finish_reason": "length",
        "token_ids": [7],
        "logprobs": {
            "tokens": ["token_id:7"],
            "token_logprobs": [-0.5],
            "top_logprobs": [{"token_id:7": -0.5, "token_id:9": -9999.0}],
        },
    }
    sample = parse_choice(Request((1,), GREEDY), choice)
    assert sample.output_ids == [7] and sample.sampled_values == [-0.5]
    assert sample.top_values[0][9] == float("-inf")


def test_port_taken_is_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(EngineFailure) as info:
            VllmServerEngine(CELL, Path("/unused"), port=port)
    assert f"port 127.0.0.1:{port} is already in use" in str(info.value) and "\n" not in str(info.value)


class _Garbage(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[dict[str, bytes]] = {"/v1/completions": b"<html>502 Bad Gateway</html>"}

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = self.bodies.get(self.path, b"{}")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def garbage_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (json.dumps({"choices": [{"index": 0, "text": "x"}]}).encode(), "malformed /v1/completions response (KeyError"),
        (
            json.dumps(
                {
                    "choices": [
                        {"index": 0, "logprobs": {"tokens": ["hello"], "token_logprobs": [0.0], "top_logprobs": [{}]}}
                    ]
                }
            ).encode(),
            "token_id:<int>",
        ),
    ],
)
def test_malformed_response_is_one_line(garbage_server: str, body: bytes, needle: str, monkeypatch: Any) -> None:
    monkeypatch.setitem(_Garbage.bodies, "/v1/completions", body)
    engine = VllmServerEngine(CELL, Path("/unused"), base_url=garbage_server, request_timeout_s=10)
    with pytest.raises(EngineFailure) as info:
        engine.generate([Request((1, 2, 3), GREEDY)])
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def _perturbed_checkpoint(source: Path, target: Path) -> Path:
    """A copy of the model with its lm_head scaled by 1.5 (fp32 safetensors): other logprobs, same shapes."""
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir()
    for name in os.listdir(source):
        if name != "model.safetensors" and (source / name).is_file():
            shutil.copy(source / name, target / name)
    weights = {k: v.to(torch.float32) for k, v in load_file(source / "model.safetensors").items()}
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1.5
    save_file(weights, target / "model.safetensors")
    return target


@pytest.mark.selftest
def test_reload_then_death_then_no_orphans(bundled_model: Path, tmp_path: Path) -> None:
    """One real server: weights reloaded from a checkpoint directory change the logprobs to that checkpoint's
    (within fp32 noise of an HF forward of it); killed, the next request is a one-line EngineFailure (no
    hang); closed, no process of its group is left."""
    from conformance.reference import HFReference

    engine = VllmServerEngine(CELL, bundled_model, request_timeout_s=60)
    pgid = engine.pid
    assert pgid is not None
    try:
        request = Request((1, 50, 60, 70, 80), GREEDY)
        before = engine.generate([request])[0][0]
        checkpoint = _perturbed_checkpoint(bundled_model, tmp_path / "step-1")
        engine.reload_weights_from_path(checkpoint)
        engine.reset_prefix_cache()
        after = engine.generate([request])[0][0]
        logits = HFReference(checkpoint).raw_logits([(request.prompt_ids, after.output_ids)])[0]
        expected = logits.log_softmax(-1)[range(len(after.output_ids)), after.output_ids].tolist()
        assert max(abs(a - b) for a, b in zip(after.sampled_values, expected)) < 1e-4
        assert max(abs(a - b) for a, b in zip(after.sampled_values, before.sampled_values)) > 1e-2  # type: ignore[operator]

        os.killpg(pgid, signal.SIGKILL)
        with pytest.raises(EngineFailure) as info:
            engine.generate([request])
        assert "vllm serve died" in info.value.reason and "\n" not in info.value.reason, info.value.reason
        assert engine.dead
    finally:
        engine.close()
    assert not group_members(pgid)
