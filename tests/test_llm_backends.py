"""The OpenAI-compatible client against a scripted HTTP server on 127.0.0.1; LLM prompt parsing and scorers."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from pipeline.explain.examples import Windows
from pipeline.explain.llm_backends import API_KEY_ENV, LlmError, OpenAIBackend
from pipeline.explain.llm_explainer import explanation_messages, marked_text, parse_explanation
from pipeline.explain.llm_scorers import fuzz_marks, llm_score, probability_of_yes


def chat_reply(text: str, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        top = [{"token": k, "logprob": v} for k, v in logprobs.items()]
        choice["logprobs"] = {
            "content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]
        }
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


class Script:
    """Replies the server gives, in order: (status, body dict or raw bytes, delay seconds); or a function."""

    def __init__(self):
        self.replies, self.requests, self.respond = [], [], None


@pytest.fixture
def server():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            status, payload, delay = script.respond(body) if script.respond else script.replies.pop(0)
            time.sleep(delay)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield script
    httpd.shutdown()
    httpd.server_close()


def test_request_shape_and_chat_reply(server, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "secret-token")
    server.replies.append((200, chat_reply("  digits in prices  "), 0))
    backend = OpenAIBackend(server.url, "my-model", timeout=5, retries=0)
    reply = backend.complete([{"role": "user", "content": "hi"}], max_tokens=12, temperature=0.0)
    assert reply.text == "digits in prices" and reply.first_token_logprobs is None
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer secret-token"
    assert request["body"] == {
        "model": "my-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 12,
        "temperature": 0.0,
    }


def test_logprob_reply(server):
    server.replies.append((200, chat_reply("1", {"1": np.log(0.6), "0": np.log(0.2), "maybe": np.log(0.1)}), 0))
    reply = OpenAIBackend(server.url, "m", retries=0).complete([{"role": "user", "content": "?"}], top_logprobs=5)
    assert server.requests[0]["body"]["logprobs"] is True and server.requests[0]["body"]["top_logprobs"] == 5
    assert probability_of_yes(reply.text, reply.first_token_logprobs) == pytest.approx(0.75)


def test_malformed_reply_is_one_clear_error(server):
    server.replies.append((200, {"id": "x", "choices": []}, 0))
    with pytest.raises(LlmError, match=r"without choices\[0\]\.message\.content"):
        OpenAIBackend(server.url, "m", retries=0).complete([{"role": "user", "content": "?"}])
    server.replies.append((200, b"<html>not json</html>", 0))
    with pytest.raises(LlmError, match="not JSON"):
        OpenAIBackend(server.url, "m", retries=0).complete([{"role": "user", "content": "?"}])


def test_timeout_then_gives_up_with_a_message(server):
    server.replies += [(200, chat_reply("late"), 1.5), (200, chat_reply("late"), 1.5)]
    backend = OpenAIBackend(server.url, "m", timeout=0.3, retries=1, backoff=0.01)
    with pytest.raises(LlmError, match="failed after 2 attempts"):
        backend.complete([{"role": "user", "content": "?"}])


def test_server_error_is_retried(server):
    server.replies += [(500, {"error": "busy"}, 0), (200, chat_reply("ok"), 0)]
    reply = OpenAIBackend(server.url, "m", retries=2, backoff=0.01).complete([{"role": "user", "content": "?"}])
    assert reply.text == "ok" and len(server.requests) == 2


def test_client_error_is_not_retried(server):
    server.replies += [(401, {"error": "no key"}, 0)]
    with pytest.raises(LlmError, match="HTTP 401"):
        OpenAIBackend(server.url, "m", retries=3, backoff=0.01).complete([{"role": "user", "content": "?"}])
    assert len(server.requests) == 1


VOCAB = ["<s>", " the", " cat", " sat", " 7", " dog", " 3"]


def windows(rows, acts) -> Windows:
    return Windows(np.array(rows), np.array(acts, dtype=np.float32), np.arange(len(rows)))


def test_prompt_marks_active_tokens_and_parses_the_phrase():
    train = windows([[1, 2, 4, 3]], [[0, 0, 5.0, 0]])
    user = explanation_messages(train, VOCAB)[1]["content"]
    assert "Example 1:  the cat<< 7>> sat" in user and "Activations: 7 (10)" in user
    assert marked_text(np.array([1, 4, 6, 3]), np.array([0, 1, 1, 0]), VOCAB) == " the<< 7 3>> sat"
    assert parse_explanation("Looking at it...\n[EXPLANATION]: numbers in text\nmore") == "numbers in text"
    assert parse_explanation("  \n'digits'\n") == "'digits'"
    assert parse_explanation("") == "unclear pattern"


def test_fuzz_marks_count_and_are_stable():
    test = windows([[1, 4, 3, 2], [1, 2, 3, 5]], [[0, 2.0, 0, 0], [0, 0, 0, 0]])
    labels = np.array([True, False])
    marks = fuzz_marks(test, labels)
    assert marks[0].tolist() == [False, True, False, False] and marks[1].sum() == 1
    assert (fuzz_marks(test, labels) == marks).all()


def test_detection_through_the_server(server):
    """A server that says yes exactly when a digit is present scores AUROC 1, balanced accuracy 1."""

    def respond(body):
        text = body["messages"][1]["content"]
        yes = any(d in text for d in ("7", "3"))
        return 200, chat_reply("1" if yes else "0", {"1": -0.1 if yes else -3.0, "0": -3.0 if yes else -0.1}), 0

    server.respond = respond
    test = windows([[1, 4, 2], [2, 6, 3], [1, 2, 3], [5, 2, 1]], [[0, 1.0, 0], [0, 2.0, 0], [0] * 3, [0] * 3])
    labels = np.array([True, True, False, False])
    score = llm_score("detection", OpenAIBackend(server.url, "m", retries=0), "digits", test, labels, VOCAB)
    assert score.metrics == {"balanced_accuracy": 1.0, "f1": 1.0, "auroc": 1.0}
    assert "digits" in server.requests[0]["body"]["messages"][0]["content"]


@pytest.mark.parametrize("style", ["transformers 5 mapping", "transformers 4 tensor"])
def test_local_backend_prompts_through_the_shared_chat_rule(tiny_model, monkeypatch, style):
    """The local backend's prompt ids are the rendered chat template, whatever apply_chat_template returns."""
    import torch
    from test_packing import chat_tokenizer

    from pipeline.explain.llm_backends import TransformersBackend

    tokenizer = chat_tokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = tokenizer("<bos>system: be brief\n<bos>user: hi\n<bos>assistant: ", add_special_tokens=False).input_ids
    if style == "transformers 4 tensor":
        real = tokenizer.apply_chat_template
        monkeypatch.setattr(
            tokenizer, "apply_chat_template", lambda m, **k: torch.tensor([list(real(m, **k)["input_ids"])])
        )
    backend = TransformersBackend(tiny_model, tokenizer, "tiny")
    ids = backend._prompt_ids(messages)
    assert ids.shape == (1, len(expected)) and ids[0].tolist() == expected
    reply = backend.complete(messages, max_tokens=3, top_logprobs=2)
    assert isinstance(reply.text, str) and len(reply.first_token_logprobs) >= 1


def test_local_backend_without_chat_template_is_a_clear_error(tiny_model, tokenizer):
    from pipeline.explain.llm_backends import TransformersBackend

    with pytest.raises(LlmError, match="^tiny has no chat template: give --llm a chat \\(instruct\\) model$"):
        TransformersBackend(tiny_model, tokenizer, "tiny")
