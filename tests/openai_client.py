"""The official `openai` client against `internvl-chat serve`, for tests/serve.rs.

    python tests/openai_client.py SCENARIO BASE_URL API_KEY MODEL < spec.json > results.json

Every scenario reads a JSON spec on stdin and prints one JSON document on stdout: what the
client saw, for the Rust test to compare with exact expectations. Requests without a "model"
ask for MODEL. An API error is recorded as
{"status": ..., "body": ...}; anything else unexpected raises (non-zero exit).
"""
import functools
import http.server
import json
import sys
import threading
import time

import httpx
import openai

MODEL = None  # set from the command line


def client(base, key, **kw):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, **kw)


# sampling fields of vLLM and LMDeploy the client does not know: sent as extra_body
EXTENSIONS = ("top_k", "repetition_penalty", "min_tokens", "reasoning", "chat_template_kwargs")


def arguments(request):
    """`create`'s keyword arguments for a request as JSON."""
    request = dict(request)
    request.setdefault("model", MODEL)
    extra = {k: request.pop(k) for k in EXTENSIONS if k in request}
    if extra:
        request["extra_body"] = extra
    return request


def ask(c, request):
    """One chat completion, streamed or not: answer, finish reason, usage, ids."""
    request = arguments(request)
    stream = request.pop("stream", False)
    try:
        if not stream:
            r = c.chat.completions.create(**request)
            out = {
                "id": r.id,
                "object": r.object,
                "model": r.model,
                "answer": r.choices[0].message.content,
                "role": r.choices[0].message.role,
                "finish_reason": r.choices[0].finish_reason,
                "usage": r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
            }
            # vLLM's and LMDeploy's extension: the client keeps it as an extra field
            extra = r.choices[0].message.model_extra or {}
            if "reasoning_content" in extra:
                out["reasoning_content"] = extra["reasoning_content"]
            return out
        pieces, reasoning, finish, usage, ids, objects, roles = [], [], None, None, set(), set(), []
        s = c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request)
        for chunk in s:
            ids.add(chunk.id)
            objects.add(chunk.object)
            if chunk.usage is not None:
                usage = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
            for ch in chunk.choices:
                if ch.delta.role:
                    roles.append(ch.delta.role)
                if ch.delta.content:
                    pieces.append(ch.delta.content)
                thought = (ch.delta.model_extra or {}).get("reasoning_content")
                if thought:
                    reasoning.append(thought)
                if ch.finish_reason:
                    finish = ch.finish_reason
        out = {
            "id": ids.pop() if len(ids) == 1 else sorted(ids),
            "object": objects.pop() if len(objects) == 1 else sorted(objects),
            "answer": "".join(pieces),
            "pieces": len(pieces),
            "role": roles[0] if roles == ["assistant"] else roles,
            "finish_reason": finish,
            "usage": usage,
        }
        if reasoning:
            out["reasoning_content"] = "".join(reasoning)
            out["reasoning_pieces"] = len(reasoning)
        return out
    except openai.APIStatusError as e:
        return {"status": e.status_code, "body": e.body}


def complete(base, key, spec):
    """spec: a list of requests; the results in order."""
    c = client(base, key)
    return [ask(c, r) for r in spec]


def models(base, key, spec):
    try:
        return {"ids": [m.id for m in client(base, key).models.list()]}
    except openai.APIStatusError as e:
        return {"status": e.status_code, "body": e.body}


def load(base, key, spec):
    """spec: {"clients": N, "requests": [...]}: every client sends every request (its own
    connection pool), all clients at once; the results per client, in order."""
    results = [None] * spec["clients"]
    errors = []

    def run(i):
        try:
            c = client(base, key)
            results[i] = [ask(c, r) for r in spec["requests"]]
        except Exception as e:  # reported, so a lost request fails the test loudly
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(spec["clients"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "errors": errors}


def load_cancels(base, key, spec):
    """spec: {"clients": N, "requests": [[...] per client]}: every client sends its own list
    of requests in order, all clients at once; a request with "cancel_after": K is streamed,
    read for K pieces, and its connection closed. The results per client, and the seconds
    the whole load took."""
    results = [None] * spec["clients"]
    errors = []

    def one(c, request):
        request = dict(request)
        k = request.pop("cancel_after", None)
        if k is None:
            return ask(c, request)
        own = client(base, key)  # its own connection, closed midway
        s = own.chat.completions.create(stream=True, **arguments(request))
        seen = 0
        for chunk in s:
            if chunk.choices and chunk.choices[0].delta.content:
                seen += 1
            if seen >= k:
                break
        s.close()
        own.close()
        return {"cancelled_after": seen}

    def run(i):
        try:
            c = client(base, key)
            results[i] = [one(c, r) for r in spec["requests"][i]]
        except Exception as e:  # reported, so a lost request fails the test loudly
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(spec["clients"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "errors": errors, "seconds": time.monotonic() - t0}


def disconnect(base, key, spec):
    """A non-streaming request given up on while it runs alone (client timeout); then a
    streaming request read for a few pieces then closed, while a second, non-streaming request
    that waits behind it gives up; then a last request."""
    alone = give_up(base, key, spec, spec["waiting"])
    c = client(base, key)
    s = c.chat.completions.create(stream=True, **arguments(spec["long"]))
    seen, first_id = [], None
    for chunk in s:
        first_id = first_id or chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            seen.append(chunk.choices[0].delta.content)
        if len(seen) >= spec["read"]:
            break
    waited = give_up(base, key, spec, spec["waiting"])
    s.close()
    last = ask(c, spec["last"])
    return {"alone": alone, "long_id": first_id, "long_pieces": len(seen), "waiting": waited, "last": last}


def give_up(base, key, spec, request):
    """A non-streaming request whose client stops waiting after give_up_after_s."""
    impatient = client(base, key, timeout=httpx.Timeout(spec["give_up_after_s"]))
    try:
        impatient.chat.completions.create(**arguments(request))
        return "answered"
    except openai.APITimeoutError:
        return "gave up"
    finally:
        impatient.close()  # hangs up at once rather than whenever the pool is collected


def raw(base, key, spec):
    """Requests sent as given (bodies that are not valid requests): status and JSON body."""
    out = []
    with httpx.Client(base_url=base, timeout=600) as h:
        for r in spec:
            headers = {"Content-Type": "application/json"}
            if r.get("key"):
                headers["Authorization"] = "Bearer " + r["key"]
            resp = h.request(r["method"], r["path"], content=r.get("body", "").encode(), headers=headers)
            out.append({"status": resp.status_code, "body": resp.json()})
    return out


def served_images(base, key, spec):
    """spec: {"dir": folder, "requests": [...]}: the folder is served over http on 127.0.0.1
    while the requests run; "{images}" in them stands for its address."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=spec["dir"])
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        where = f"http://127.0.0.1:{httpd.server_address[1]}"
        requests = json.loads(json.dumps(spec["requests"]).replace("{images}", where))
        try:
            return complete(base, key, requests)
        finally:
            httpd.shutdown()


SCENARIOS = {"complete": complete, "served_images": served_images, "models": models, "load": load, "load_cancels": load_cancels, "disconnect": disconnect, "raw": raw}

if __name__ == "__main__":
    scenario, base, key, MODEL = sys.argv[1:5]
    spec = json.load(sys.stdin)
    json.dump(SCENARIOS[scenario](base, key, spec), sys.stdout)
