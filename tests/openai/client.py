"""The real `openai` Python package against a running dllm-chat (started by tests/openai.rs).

Usage: client.py BASE_URL API_KEY MODEL_ID SESSION_ID
Exits non-zero (an AssertionError or an unexpected exception) when anything is off.
"""

import sys

import openai

base_url, api_key, model, session_id = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
question = [{"role": "user", "content": "Where is my order NW-12345?"}]

# The one model this service runs.
ids = [m.id for m in client.models.list()]
assert ids == [model], ids

# A plain completion.
plain = client.chat.completions.create(model=model, messages=question, max_tokens=16)
choice = plain.choices[0]
assert choice.message.role == "assistant", choice
assert isinstance(choice.message.content, str), choice
assert choice.finish_reason in ("stop", "length"), choice.finish_reason
assert plain.usage.prompt_tokens > 0 and plain.usage.completion_tokens > 0, plain.usage
assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
assert plain.id.startswith("chatcmpl-"), plain.id

# Streamed, with usage at the end: the deltas add up to the same (greedy) reply.
chunks = list(
    client.chat.completions.create(
        model=model, messages=question, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == choice.message.content, (text, choice.message.content)
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finishes == [choice.finish_reason], finishes
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

# With the whole revision on every chunk: the appended text only ever grows and ends as the
# final revision shows it.
stream = client.chat.completions.create(
    model=model,
    messages=question,
    max_tokens=16,
    stream=True,
    extra_body={"dllm": {"revisions": True, "options": {"steps": 16}}},
)
revisions, sent = [], ""
for chunk in stream:
    extra = chunk.model_extra or {}
    if "dllm_revision" in extra:
        revisions.append(extra["dllm_revision"])
    if chunk.choices and chunk.choices[0].delta.content:
        sent += chunk.choices[0].delta.content
        settled = revisions[-1]["text"].split("\u2591")[0] if revisions else sent
        assert sent.startswith(settled.rstrip("\ufffd")) or settled.startswith(sent), (sent, settled)
assert len(revisions) >= 2, revisions
masked = [r["masked"] for r in revisions]
assert masked == sorted(masked, reverse=True) and masked[-1] == 0, masked
assert sent == revisions[-1]["text"], (sent, revisions[-1])

# A stored session through the session_id extension.
stored = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hi from the openai client"}], extra_body={"session_id": session_id}
)
assert stored.choices[0].message.content is not None

# Errors come as the matching exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=question)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e
try:
    openai.OpenAI(base_url=base_url, api_key="sk-wrong-key-000", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x" * 5000}])
    raise AssertionError("an over-long message was accepted")
except openai.APIStatusError as e:
    assert e.status_code == 413, e
try:
    client.chat.completions.create(model=model, messages=[{"role": "assistant", "content": "hello"}])
    raise AssertionError("a conversation without a user message was accepted")
except openai.BadRequestError as e:
    assert e.code == "invalid_field", e
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 790}])
    raise AssertionError("a prompt larger than the context was accepted")
except openai.BadRequestError as e:
    assert e.code == "context_length_exceeded", e

print("openai client: all checks passed")
