"""``extauthz verify`` over HTTP: a suspect that learned the guard's misinformation is convicted
by the misinformation mark; the honest model is not."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from extauthz.demo.model import DemoModel, load_data
from extauthz.evidence.cli import main
from extauthz.evidence.ledger import EvidenceRecord, export_jsonl
from extauthz.keys import KeyRing
from extauthz.protect.perturb import wrong_classes
from extauthz.protect.watermark import marked_label, watermark_rows

NOISE_KEY = b"0123456789abcdef0123456789abcdef"
Predict = Callable[[np.ndarray], np.ndarray]


@pytest.fixture(scope="module")
def victim() -> DemoModel:
    return DemoModel.train(seed=0)


def _serve(predict: Predict) -> Iterator[str]:
    """Serve ``predict`` as a KServe v1 endpoint on a free port; yield its URL."""

    async def handle(request: web.Request) -> web.Response:
        x = np.asarray((await request.json())["instances"], dtype=np.float64)
        return web.json_response({"predictions": predict(x).tolist()})

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_post("/v1/models/m:predict", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield f"http://127.0.0.1:{port}/v1/models/m:predict"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def model_url(victim: DemoModel) -> Iterator[str]:
    yield from _serve(victim.predict_proba)


@pytest.fixture(scope="module")
def clone_url(victim: DemoModel) -> Iterator[str]:
    wrong = wrong_classes(NOISE_KEY, 10)
    yield from _serve(lambda x: np.eye(10)[wrong[victim.predict_proba(x).argmax(axis=1)]])


@pytest.fixture
def files(tmp_path: Path, victim: DemoModel) -> dict[str, Path]:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("current: k1\nkeys: {k1: verify-cli-test-key-0123456789}\n")
    keys = KeyRing.from_file(keys_file)
    x = load_data(0)[1][:60]
    served = marked_label(keys, watermark_rows(x), 10, victim.predict_proba(x).argmax(axis=1))
    out = io.StringIO()
    export_jsonl(
        [
            EvidenceRecord("key:thief", "k1", 0.0, json.dumps(row.tolist()).encode(), int(label))
            for row, label in zip(x, served, strict=True)
        ],
        out,
    )
    (tmp_path / "ledger.jsonl").write_text(out.getvalue())
    np.save(tmp_path / "probe.npy", load_data(0)[1][60:460])
    (tmp_path / "noise.key").write_bytes(NOISE_KEY + b"\n")
    return {
        "keys": keys_file,
        "ledger": tmp_path / "ledger.jsonl",
        "probe": tmp_path / "probe.npy",
        "noise": tmp_path / "noise.key",
    }


def _verify(files: dict[str, Path], suspect: str, model: str) -> list[str]:
    return [
        "--evidence", str(files["ledger"]),
        "--keys-file", str(files["keys"]),
        "--suspect-url", suspect,
        "--probe", str(files["probe"]),
        "--model-url", model,
        "--noise-key-file", str(files["noise"]),
    ]  # fmt: skip


class TestVerifyMisinformation:
    """The misinformation mark convicts a misinformed clone and spares the honest model."""

    def test_misinformed_clone_is_convicted(
        self,
        files: dict[str, Path],
        clone_url: str,
        model_url: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        assert main(_verify(files, clone_url, model_url)) == 0
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.startswith("misinform"))
        assert float(line.split()[-1]) < 1e-6
        assert "a clone" in out

    def test_honest_model_is_not_accused(
        self, files: dict[str, Path], model_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(_verify(files, model_url, model_url)) == 0
        out = capsys.readouterr().out
        line = next(line for line in out.splitlines() if line.startswith("misinform"))
        assert float(line.split()[-1]) == 1.0
        assert "no evidence of cloning" in out

    def test_the_mark_needs_all_its_inputs(self, files: dict[str, Path], model_url: str) -> None:
        with pytest.raises(SystemExit):
            main(["--evidence", str(files["ledger"]), "--keys-file", str(files["keys"]),
                  "--suspect-url", model_url, "--noise-key-file", str(files["noise"])])  # fmt: skip
