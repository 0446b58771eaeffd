"""Real models: replies cut at the chat template's end markers, for every backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import copy_recipe_folder, without_adapters

from turnflow.backend import template_stops
from turnflow.nodes.llm import ChatClient, StopTrimmer
from turnflow.session import Session

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# what Gemma 3 270M (base) under its packaged ChatML template sends after a reply, measured upstream
RUN_ON = "Sure thing, see you there.<|im_end|>\n<|im_"


def test_stop_sequences_come_from_the_chat_templates_turn_markers() -> None:
    assert template_stops(CHATML) == ["<|im_start|>", "<|im_end|>"]
    assert template_stops(GEMMA) == ["<start_of_turn>", "<end_of_turn>"]
    assert template_stops("{{ messages }}") == []


def test_the_trimmer_holds_back_a_marker_split_across_deltas() -> None:
    trim = StopTrimmer(["<|im_end|>", "<|im_start|>"])
    pieces = [trim.feed(p) for p in ("Hi <", "b> there", " <|im", "_en", "d|>\nmore")]
    assert "".join(pieces) == "Hi <b> there " and trim.stopped
    assert trim.feed("later") == "" and trim.flush() == ""
    open_ended = StopTrimmer(["<|im_end|>"])
    assert open_ended.feed("a <|") == "a " and open_ended.flush() == "<|"  # no marker after all: it is text


def test_a_reply_streamed_over_http_stops_at_the_end_marker() -> None:
    from stubs import echo_model

    sent: list[dict[str, Any]] = []
    with echo_model(RUN_ON, requests=sent) as url:
        client = ChatClient(url)
        try:
            stream = client.stream([{"role": "user", "content": "hi"}], max_tokens=32, temperature=0,
                                   stop=template_stops(CHATML))
            deltas = [d.text for d in stream]
        finally:
            client.close()
    assert "".join(deltas) == stream.reply.text == "Sure thing, see you there."
    assert stream.reply.finish_reason == "stop"
    assert sent[0]["stop"] == ["<|im_start|>", "<|im_end|>"]  # the server is asked too


def test_a_run_on_reply_never_reaches_the_history(tmp_path: Path) -> None:
    from stubs import echo_model

    recipe = copy_recipe_folder(tmp_path)
    without_adapters(recipe, "maya")
    sent: list[dict[str, Any]] = []
    with echo_model(RUN_ON, chat_template=CHATML, requests=sent) as url:
        (recipe.parent / "backends.yaml").write_text(f"backends:\n  echo:\n    kind: openai\n    url: {url}\n")
        with Session(recipe, backend="echo", state_dir=tmp_path / "state") as session:
            result = session.turn(persona="maya", room="r", text="hi")
            stored = session.store.history("r")[-1]
    assert result.reply == stored.text == "Sure thing, see you there."
    assert sent[-1]["stop"] == ["<|im_start|>", "<|im_end|>"]


def test_a_backend_without_a_template_takes_its_stops_from_request_defaults(tmp_path: Path) -> None:
    from stubs import echo_model

    recipe = copy_recipe_folder(tmp_path)
    without_adapters(recipe, "maya")
    with echo_model("Fine. END more") as url:
        (recipe.parent / "backends.yaml").write_text(
            f"backends:\n  echo:\n    kind: openai\n    url: {url}\n    request_defaults:\n      stop: [' END']\n")
        with Session(recipe, backend="echo", state_dir=tmp_path / "state") as session:
            result = session.turn(persona="maya", room="r", text="hi")
    assert result.reply == "Fine."
