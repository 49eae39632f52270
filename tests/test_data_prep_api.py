"""data_prep HTTP clients against a local fake OpenAI-compatible server (127.0.0.1 only):
image generation (success, retry after errors, Retry-After, rate limit, resume after an
interruption, refused items, wrong key) and the LLM prompt rewriter."""

import base64
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from data_prep import common, generate_images, prompts


def png_b64(color, size=(24, 16)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class FakeServer:
    """OpenAI-compatible fake: ``script`` is a list of (status, body dict, headers) answers
    consumed in order; when it runs out, ``default(request)`` answers. Every request is logged
    with its arrival time (time.monotonic), path, headers and JSON body."""

    def __init__(self, default=None):
        self.script = []
        self.requests = []
        self.default = default
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                req = {"t": time.monotonic(), "path": self.path, "body": body,
                       "auth": self.headers.get("Authorization")}
                server.requests.append(req)
                if server.script:
                    status, answer, headers = server.script.pop(0)
                else:
                    status, answer, headers = server.default(req)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def image_answer(req):
    # A color derived from the prompt, so each image is recognisably its own.
    seed = sum(req["body"]["prompt"].encode()) % 200
    return 200, {"created": 0, "data": [{"b64_json": png_b64((seed, 50, 100)),
                                         "revised_prompt": "revised: " + req["body"]["prompt"]}]}, {}


@pytest.fixture
def server():
    s = FakeServer(default=image_answer)
    yield s
    s.close()


RECORDS = [{"id": f"color_{i:04d}", "prompt": f"a red thing number {i}", "category": "color",
            "phrases": [{"phrase": "a red thing", "count": 1}], "source": "template"}
           for i in range(5)]


def make_source(server, rpm=0, retries=3, key="sk-test"):
    client = common.JSONClient(server.url, key, max_retries=retries, backoff=0.01,
                               limiter=common.RateLimiter(rpm), log=lambda m: None)
    return generate_images.APISource(client, "dall-e-3", "1024x1024", "standard"), client


def test_api_success_writes_images_and_manifest(server, tmp_path):
    source, client = make_source(server)
    stats = generate_images.generate_all(RECORDS[:2], source, str(tmp_path), show_progress=False)
    assert stats == {"total": 2, "skipped": 0, "generated": 2, "failed": 0}
    assert [r["path"] for r in server.requests] == ["/v1/images/generations"] * 2
    body = server.requests[0]["body"]
    assert body == {"model": "dall-e-3", "prompt": "a red thing number 0", "n": 1,
                    "size": "1024x1024", "quality": "standard", "response_format": "b64_json"}
    assert server.requests[0]["auth"] == "Bearer sk-test"
    lines = common.read_jsonl(str(tmp_path / "manifest.jsonl"))
    assert [l["id"] for l in lines] == ["color_0000", "color_0001"]
    first = lines[0]
    assert first["image"] == "images/color_0000.png" and first["source"] == "api:dall-e-3"
    assert first["seed"] is None and first["prompt"] == "a red thing number 0"
    assert first["revised_prompt"] == "revised: a red thing number 0"
    assert first["phrases"] == RECORDS[0]["phrases"] and first["prompt_source"] == "template"
    assert first["time"].endswith("Z") and (first["width"], first["height"]) == (24, 16)
    pixels = np.asarray(Image.open(tmp_path / "images" / "color_0000.png"))
    expected = sum(b"a red thing number 0") % 200
    assert pixels.shape == (16, 24, 3) and (pixels == [expected, 50, 100]).all()


def test_api_retries_after_errors_with_backoff(server, tmp_path):
    server.script = [(500, {"error": {"message": "boom"}}, {}),
                     (429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"})]
    sleeps = []
    source, client = make_source(server)
    client._sleep = lambda s: (sleeps.append(s), time.sleep(s))
    stats = generate_images.generate_all(RECORDS[:1], source, str(tmp_path), show_progress=False)
    assert stats["generated"] == 1 and len(server.requests) == 3 and client.attempts == 3
    # backoff 0.01 * 2**k * jitter in [1, 1.25); the 429's Retry-After (0.2 s) wins over 0.02.
    assert 0.01 <= sleeps[0] < 0.0125 and sleeps[1] == pytest.approx(0.2)
    assert server.requests[2]["t"] - server.requests[1]["t"] >= 0.2


def test_api_rate_limit_spaces_requests(server, tmp_path):
    source, client = make_source(server, rpm=600)  # one request start per 0.1 s
    waits = []
    wait = client.limiter.wait
    client.limiter.wait = lambda: (waits.append(wait()), waits[-1])[1]
    t0 = time.monotonic()
    generate_images.generate_all(RECORDS[:4], source, str(tmp_path), show_progress=False)
    elapsed = time.monotonic() - t0
    # Every request start went through the limiter, and 4 starts need at least 3 intervals.
    # (Gaps between arrivals at the server also hold a loaded machine's scheduling delays, so
    # they are not asserted; test_rate_limiter_with_fake_clock checks the spacing exactly.)
    assert len(server.requests) == 4 and len(waits) == 4 and waits[0] == 0.0
    assert elapsed >= 0.3 - 1e-3, elapsed


def test_rate_limiter_with_fake_clock():
    now = [100.0]
    waits = []

    def sleep(s):
        waits.append(s)
        now[0] += s

    limiter = common.RateLimiter(30, clock=lambda: now[0], sleep=sleep)  # 2 s apart
    assert limiter.wait() == 0.0
    now[0] += 0.5
    assert limiter.wait() == pytest.approx(1.5)
    now[0] += 5.0
    assert limiter.wait() == 0.0
    assert waits == [pytest.approx(1.5)]
    assert common.RateLimiter(0).wait() == 0.0
    with pytest.raises(common.DataPrepError, match="rate limit must be >= 0"):
        common.RateLimiter(-1)


def test_api_resume_after_interruption(server, tmp_path):
    source, _ = make_source(server)
    done = []

    def stop_after_two(line):
        done.append(line["id"])
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_images.generate_all(RECORDS, source, str(tmp_path), on_item=stop_after_two,
                                     show_progress=False)
    assert len(server.requests) == 2
    # An image written without its manifest line and a manifest line cut mid-write (the
    # crash window) are both redone; a manifest line whose image vanished is redone too.
    (tmp_path / "images" / "color_0002.png").write_bytes(b"partial")
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"id": "color_0003", "prompt": "a red th')
    os.remove(tmp_path / "images" / "color_0001.png")
    stats = generate_images.generate_all(RECORDS, source, str(tmp_path), show_progress=False)
    assert stats == {"total": 5, "skipped": 1, "generated": 4, "failed": 0}
    prompts_sent = [r["body"]["prompt"] for r in server.requests]
    assert prompts_sent == [f"a red thing number {i}" for i in (0, 1, 1, 2, 3, 4)]
    lines = common.read_jsonl(str(tmp_path / "manifest.jsonl"))
    assert sorted({l["id"] for l in lines}) == [r["id"] for r in RECORDS]
    assert all(Image.open(tmp_path / l["image"]).size == (24, 16) for l in lines)
    # A third run has nothing to do and sends nothing.
    stats = generate_images.generate_all(RECORDS, source, str(tmp_path), show_progress=False)
    assert stats["skipped"] == 5 and stats["generated"] == 0 and len(server.requests) == 6


def test_api_refused_item_is_logged_and_wrong_key_stops(server, tmp_path):
    server.script = [(400, {"error": {"message": "content policy violation"}}, {})]
    source, _ = make_source(server)
    stats = generate_images.generate_all(RECORDS[:2], source, str(tmp_path), show_progress=False)
    assert stats == {"total": 2, "skipped": 0, "generated": 1, "failed": 1}
    failures = common.read_jsonl(str(tmp_path / "failures.jsonl"))
    assert failures[0]["id"] == "color_0000" and "HTTP 400 content policy violation" in failures[0]["error"]
    server.script = [(401, {"error": {"message": "Incorrect API key"}}, {})]
    with pytest.raises(generate_images.FatalSourceError, match="HTTP 401 Incorrect API key"):
        generate_images.generate_all(RECORDS[:2], source, str(tmp_path), show_progress=False)
    # Retries spent on 503s also stop the run (resume later) instead of skipping items.
    server.script = [(503, {"error": {"message": "overloaded"}}, {})] * 3
    source, _ = make_source(server, retries=2)
    with pytest.raises(generate_images.FatalSourceError, match="HTTP 503 overloaded"):
        generate_images.generate_all(RECORDS[:1], source, str(tmp_path / "b"), show_progress=False)


def test_generate_images_cli(server, tmp_path, monkeypatch, capsys):
    prompt_file = tmp_path / "prompts.jsonl"
    common.write_jsonl(str(prompt_file), RECORDS[:2])
    monkeypatch.setenv("TEST_IMAGE_KEY", "sk-cli")
    out = tmp_path / "work"
    rc = generate_images.main(["--prompts", str(prompt_file), "--out", str(out), "--base-url",
                               server.url, "--api-key-env", "TEST_IMAGE_KEY", "--rpm", "0",
                               "--max-side", "12", "--quiet", "--model", "gpt-image-1"])
    assert rc == 0 and "'generated': 2" in capsys.readouterr().out
    assert server.requests[0]["auth"] == "Bearer sk-cli"
    assert "response_format" not in server.requests[0]["body"]  # gpt-image-* answers base64
    assert Image.open(out / "images" / "color_0001.png").size == (12, 8)
    monkeypatch.delenv("TEST_IMAGE_KEY")
    rc = generate_images.main(["--prompts", str(prompt_file), "--out", str(out), "--api-key-env",
                               "TEST_IMAGE_KEY"])
    assert rc == 1 and "needs an API key in $TEST_IMAGE_KEY" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a/b", "prompt": "x"}\n')
    assert generate_images.main(["--prompts", str(bad), "--out", str(out)]) == 1
    assert "'id' may only hold letters" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# LLM rewriter.
# ----------------------------------------------------------------------------------------------


def chat_answer(text):
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}, {}


def test_llm_rewrite_validates_and_resumes(server, tmp_path):
    records = prompts.generate_prompts({"color": 3}, seed=0)
    p0, p1 = [p["phrase"] for p in records[0]["phrases"]]

    def answer(req):
        template = req["body"]["messages"][1]["content"].split("\n")[0][len("Prompt: "):]
        if template == records[1]["template"]:
            return chat_answer("a picture of something else")  # loses the phrases
        if template == records[2]["template"]:
            return 400, {"error": {"message": "bad request"}}, {}
        return chat_answer(f"{p0.capitalize()} stands beside {p1} in the sun.")

    server.default = answer
    client = common.JSONClient(server.url, "sk", backoff=0.01, log=lambda m: None)
    partial = str(tmp_path / "prompts.jsonl.rewrites.jsonl")
    stats = prompts.rewrite_records(records, lambda b: client.post("chat/completions", b),
                                    "test-model", partial, show_progress=False)
    assert stats == {"rewritten": 1, "rejected": 2, "reused": 0}
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert server.requests[0]["body"]["model"] == "test-model"
    assert records[0]["prompt"] == f"{p0.capitalize()} stands beside {p1} in the sun."
    # The phrases are the rewrite's exact substrings (case as written there).
    assert [p["phrase"] for p in records[0]["phrases"]] == [p0.capitalize(), p1]
    assert records[0]["rewritten_by"] == "test-model"
    assert records[1]["prompt"] == records[1]["template"]
    assert records[1]["rewrite_error"] == f"rewrite lost the phrase {records[1]['phrases'][0]['phrase']!r}"
    assert "HTTP 400 bad request" in records[2]["rewrite_error"]
    # Resume: a fresh run over the same templates reuses every cached answer, sends nothing.
    again = prompts.generate_prompts({"color": 3}, seed=0)
    n = len(server.requests)
    stats = prompts.rewrite_records(again, lambda b: client.post("chat/completions", b),
                                    "test-model", partial, show_progress=False)
    assert stats == {"rewritten": 0, "rejected": 0, "reused": 3} and len(server.requests) == n
    assert again[0]["prompt"] == records[0]["prompt"]


def test_prompts_cli_llm(server, tmp_path, monkeypatch):
    server.default = lambda req: chat_answer(
        req["body"]["messages"][1]["content"].split("\n")[0][len("Prompt: "):] + ", in a photo")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    out = tmp_path / "p.jsonl"
    assert prompts.main(["--out", str(out), "--counts", "spatial=4", "--rewrite", "llm",
                         "--rpm", "0", "--quiet"]) == 0
    recs = common.read_jsonl(str(out))
    assert len(recs) == 4 and len(server.requests) == 4
    assert all(r["prompt"] == r["template"] + ", in a photo" for r in recs)
