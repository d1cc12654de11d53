"""Chat templates: parity with transformers' apply_chat_template, built-in formats, errors."""

import json
import re
import shutil

import pytest
import tokenizers
from tokenizer_fixtures import (
    PHI3_CHAT_TEMPLATE,
    PHI4_MINI_SPECIAL_TOKENS,
    make_bpe_dir,
    make_phi3_dir,
)

from phi3_jax import chat
from phi3_jax.tokenizer import Tokenizer

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "Can you provide ways to eat combinations of bananas?"}
ASSISTANT = {"role": "assistant", "content": "Sure!\n1. Banana smoothie\n2. Banana salad 🍌"}
USER_2 = {"role": "user", "content": "  And dragonfruits?  \n"}

CONVERSATIONS = [
    [USER],
    [SYSTEM, USER],
    [SYSTEM, USER, ASSISTANT, USER_2],
    [{"role": "system", "content": ""}, USER, ASSISTANT],
]

# Phi-3.5-mini's (drops empty system turns) and Phi-3-medium's (no system role, no generation
# prompt branch), from the checkpoints' tokenizer_config.json.
PHI35_TEMPLATE = PHI3_CHAT_TEMPLATE.replace(
    "message['role'] == 'system' %}", "message['role'] == 'system' and message['content'] %}"
)
PHI3_MEDIUM_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
    "{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_checkpoint_template_matches_transformers(
    phi3, hf_phi3, phi3_hub_dir, messages, add_generation_prompt
):
    """The text is transformers' rendering; the ids are the checkpoint's tokenizer.json's (which
    transformers v5 does not reproduce, see test_tokenizer.py), from either tokenizer file."""
    assert phi3.chat_format.name == "checkpoint"
    text = phi3.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_phi3.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    hub = tokenizers.Tokenizer.from_file(str(phi3_hub_dir / "tokenizer.json"))
    ids = hub.encode(text, add_special_tokens=False).ids
    assert phi3.encode_chat(messages, add_generation_prompt=add_generation_prompt) == ids
    with_json = Tokenizer.from_dir(phi3_hub_dir)
    assert with_json.encode_chat(messages, add_generation_prompt=add_generation_prompt) == ids


@pytest.mark.parametrize("template", [PHI35_TEMPLATE, PHI3_MEDIUM_TEMPLATE])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_other_phi3_templates_match_transformers(phi3, hf_phi3, template, messages):
    tokens = {"bos_token": "<s>", "eos_token": "<|endoftext|>"}
    ours = chat.render(
        chat.checkpoint_format(template),
        messages,
        add_generation_prompt=True,
        special_tokens=tokens,
    )
    expected = hf_phi3.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert ours == expected


def test_phi4_mini_template_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = make_bpe_dir(tmp_path, PHI4_MINI_SPECIAL_TOKENS, chat_template=chat.PHI4_MINI.template)
    tools = json.dumps([{"name": "add", "parameters": {"a": {"type": "int"}}}])
    messages = [{**SYSTEM, "tools": tools}, USER, ASSISTANT, USER_2]
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    for gen in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == (
            ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        )


def test_generation_prompt_default_follows_the_last_turn(phi3, hf_phi3):
    """Without add_generation_prompt, a chat ending in an assistant turn renders as transformers'
    default (False) renders it; one ending in a user turn gets the assistant header (a
    prompt), which transformers needs add_generation_prompt=True for."""
    done = [SYSTEM, USER, ASSISTANT]
    assert phi3.apply_chat_template(done) == hf_phi3.apply_chat_template(done, tokenize=False)
    assert phi3.encode_chat(done) == phi3.encode_chat(done, add_generation_prompt=False)
    prompt = [SYSTEM, USER]
    assert phi3.apply_chat_template(prompt) == hf_phi3.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True)
    assert phi3.apply_chat_template(done) != phi3.apply_chat_template(
        done, add_generation_prompt=True)


# --- built-in formats --------------------------------------------------------------------------


def test_phi3_fallback(tmp_path):
    tok = Tokenizer.from_dir(make_phi3_dir(tmp_path, chat_template=None))
    assert tok.chat_format is chat.PHI3
    assert tok.apply_chat_template([SYSTEM, USER]) == (
        f"<|system|>\n{SYSTEM['content']}<|end|>\n<|user|>\n{USER['content']}<|end|>\n"
        "<|assistant|>\n"
    )
    assert tok.apply_chat_template([USER, ASSISTANT], add_generation_prompt=False) == (
        f"<|user|>\n{USER['content']}<|end|>\n<|assistant|>\n{ASSISTANT['content']}<|end|>\n"
        "<|endoftext|>"
    )
    # The rstrip tokens swallow the template's newlines, so they cost no ids.
    ids = tok.encode_chat([USER])
    assert ids[0] == tok.token_id("<|user|>")
    assert ids[-2:] == [tok.token_id("<|end|>"), tok.token_id("<|assistant|>")]
    assert tok.decode(ids[1:-2]) == USER["content"]
    assert tok.token_id("<0x0A>") not in ids


def test_phi4_mini_fallback(tmp_path):
    tok = Tokenizer.from_dir(make_bpe_dir(tmp_path, PHI4_MINI_SPECIAL_TOKENS))
    assert tok.chat_format is chat.PHI4_MINI
    system = {**SYSTEM, "tools": '[{"name": "add"}]'}
    assert tok.apply_chat_template([system, USER]) == (
        f'<|system|>{SYSTEM["content"]}<|tool|>[{{"name": "add"}}]<|/tool|><|end|>'
        f"<|user|>{USER['content']}<|end|><|assistant|>"
    )
    assert tok.apply_chat_template([USER, ASSISTANT], add_generation_prompt=False) == (
        f"<|user|>{USER['content']}<|end|><|assistant|>{ASSISTANT['content']}<|end|><|endoftext|>"
    )


def test_phi4_fallback(tmp_path):
    tok = Tokenizer.from_dir(make_bpe_dir(tmp_path))
    assert tok.chat_format is chat.PHI4
    assert tok.apply_chat_template([SYSTEM, USER]) == (
        f"<|im_start|>system<|im_sep|>{SYSTEM['content']}<|im_end|>"
        f"<|im_start|>user<|im_sep|>{USER['content']}<|im_end|>"
        "<|im_start|>assistant<|im_sep|>"
    )
    assert tok.apply_chat_template([USER], add_generation_prompt=False) == (
        f"<|im_start|>user<|im_sep|>{USER['content']}<|im_end|>"
    )
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "{}"}])


def test_no_template_and_no_chat_tokens(tmp_path):
    tok = Tokenizer.from_dir(make_bpe_dir(tmp_path, ("<|endoftext|>",)))
    assert tok.chat_format is None
    with pytest.raises(ValueError, match="cannot format a chat"):
        tok.apply_chat_template([USER])


# --- where templates come from -----------------------------------------------------------------


def test_chat_template_jinja_overrides_config(tmp_path):
    path = make_phi3_dir(tmp_path)
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_dir(path).apply_chat_template([USER]) == USER["content"] + "!"


def test_chat_template_json_and_named_templates(tmp_path):
    path = make_phi3_dir(tmp_path, chat_template=None)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ bos_token }}"}))
    assert Tokenizer.from_dir(path).apply_chat_template([USER]) == "json:<s>"
    named = [{"name": "tool_use", "template": "no"}, {"name": "default", "template": "yes"}]
    assert chat.read_chat_format(path, {"chat_template": named}).template == "yes"


# --- rendering rules and errors ----------------------------------------------------------------


def _render(template, messages, add_generation_prompt=True):
    return chat.render(
        chat.checkpoint_format(template),
        messages,
        add_generation_prompt=add_generation_prompt,
        special_tokens={"eos_token": "</s>"},
    )


def test_jinja_environment_matches_transformers():
    # trim_blocks/lstrip_blocks, loop controls, a tojson that keeps "<" and non-ASCII as they are.
    template = (
        "{% for m in messages %}\n    {% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{{ m | tojson }}\n{% endfor %}"
    )
    message = {"role": "user", "content": "<b>é</b>"}
    assert _render(template, [message, USER]) == json.dumps(message, ensure_ascii=False) + "\n"
    # None values are dropped, so templates can test for a key's presence.
    template = "{{ 'tools' in messages[0] }}"
    assert _render(template, [{**USER, "tools": None}]) == "False"


def test_raise_exception_becomes_value_error():
    template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        _render(template, [USER])


def test_template_is_sandboxed():
    with pytest.raises(ValueError, match="rejected"):
        _render("{{ messages.__class__.__mro__[1].__subclasses__() }}", [USER])


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ([], ValueError, "empty"),
        ("hello", TypeError, "list of dicts"),
        (["hello"], TypeError, r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], ValueError, r"messages\[0\] has no 'role'"),
        ([USER, {"role": "assistant"}], ValueError, r"messages\[1\] has no 'content'"),
        ([{"role": "robot", "content": "hi"}], ValueError, "unknown role 'robot'"),
        ([{"role": "user", "content": ["hi"]}], TypeError, "must be a string"),
    ],
)
def test_invalid_messages(phi3, messages, error, match):
    with pytest.raises(error, match=match):
        phi3.apply_chat_template(messages)


# --- bounded rendering (issue 15) -------------------------------------------------------------
# The sandbox alone lets a template exhaust the machine; every render is bounded, and a template
# that goes past a bound is a ValueError naming the template's file.

RUNAWAY = [
    # the probe's two
    ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    ("{{ 'a' * 10**12 }}", "a repetition would build 1,000,000,000,000 items"),
    # the same class: one step that allocates or computes too much
    ("{{ [0] * 10**9 }}", "a repetition would build 1,000,000,000 items"),
    ("{{ 10 ** (10 ** 10) }}", "an integer of about 40,000,000,000 bits"),
    ("{{ 'x' | center(10**10) }}", "the center filter's argument of 10,000,000,000"),
    ("{{ 'x'.ljust(10**10) }}", "str.ljust width of 10,000,000,000"),
    ("{{ 'x'.zfill(10**10) }}", "str.zfill width of 10,000,000,000"),
    ("{{ '%999999999d' % 1 }}", "a format width of 999,999,999"),
    ("{{ '%*d' % (10**9, 1) }}", "a format width of 1,000,000,000"),
    ("{{ '%.999999999f' | format(1.5) }}", "a format width of 999,999,999"),
    ("{{ '{:999999999}'.format(1) }}", "a format width of 999,999,999"),
    ("{{ '{:{w}}'.format(1, w=10**9) }}", "a format width of 1,000,000,000"),
    ("{{ ('x' * 10**6).replace('', 'yyyyyyyyyyyyyyyyy') }}", "str.replace would build"),
    ("{{ ('\t' * 1000).expandtabs(10**6) }}", "str.expandtabs would build"),
    ("{{ messages | tojson(indent=10**9) }}", "the tojson filter's argument of 1,000,000,000"),
    ("{{ range(10) | batch(10**9, 'x') | list }}", "the batch filter's argument"),
    ("{{ ('x\n' * 100000) | indent(1000) }}", "the indent filter would build"),
    # growth over many steps: doubling, squaring
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s }}", "it built a string of length 33,554,432"),
    ("{% set ns = namespace(s=['a']) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}", "a concatenation would build 33,554,432 items"),
    ("{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
     "{% endfor %}", "an integer of about 103,874 bits"),
    # time: loops that allocate nothing
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "it ran more than 2,000,000 steps"),
    ("{{ lipsum(10**5) }}", "it ran more than 2,000,000 steps"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "its output passed 16,777,216"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "it recursed too deeply"),
]


@pytest.mark.parametrize("template,reason", RUNAWAY, ids=[t[:40] for t, _ in RUNAWAY])
def test_runaway_template_is_stopped(template, reason):
    fmt = chat.checkpoint_format(template, "/models/evil/chat_template.jinja")
    with pytest.raises(ValueError) as e:
        chat.render(fmt, [USER], add_generation_prompt=True, special_tokens={})
    message = str(e.value)
    assert message.startswith("the chat template of /models/evil/chat_template.jinja was "
                              "stopped: "), message
    assert reason in message and "\n" not in message


@pytest.mark.parametrize("template,expected", [
    ("{{ 'ab' * 3 }}|{{ 3 * 'ab' }}|{{ [1] * 2 }}|{{ 2 ** 64 }}", "ababab|ababab|[1, 1]|"
                                                                 "18446744073709551616"),
    ("{{ '%05.1f|%s' % (3.14159, 'x') }}|{{ '%d-%s' | format(3, 'b') }}", "003.1|x|3-b"),
    ("{{ '{:>6}|{:.2f}'.format('a', 2.5) }}|{{ 'ab'.center(6, '*') }}", "     a|2.50|**ab**"),
    ("{{ messages | tojson(indent=2) | length > 0 }}|{{ ('a\nb' | indent(2)) }}", "True|a\n  b"),
    ("{% for i in range(1000) %}{% endfor %}{{ range(100000) | length }}", "100000"),
])
def test_templates_within_bounds_render_as_python_does(template, expected):
    assert _render(template, [USER]) == expected


@pytest.mark.parametrize("template,message", [
    ("{{ 1 / 0 }}", "failed: ZeroDivisionError: division by zero"),
    ("{% for m in messages %}", "is not a valid template: Unexpected end of template."),
])
def test_template_errors_name_the_source(template, message):
    fmt = chat.checkpoint_format(template, "/m/tokenizer_config.json")
    with pytest.raises(ValueError, match=re.escape(
            f"the chat template of /m/tokenizer_config.json {message}")):
        chat.render(fmt, [USER], add_generation_prompt=True, special_tokens={})


def test_template_errors_name_its_file_through_the_cli(tmp_path, capsys):
    from conftest import cli_error

    from phi3_jax.embedded import MODEL_DIR

    model = shutil.copytree(MODEL_DIR, tmp_path / "model")
    (model / "chat_template.jinja").write_text("{% for i in range(10**9) %}x{% endfor %}")
    err = cli_error(capsys, "generate", "--model", str(model), "--prompt", "1+1=", "--chat")
    assert (f"the chat template of {model / 'chat_template.jinja'} was stopped: it asked for "
            f"too much (OverflowError: Range too big.") in err


def test_a_long_chat_renders_within_the_bounds(phi3, hf_phi3):
    """1,000 turns (some 260 kB of prompt, ~30k steps): far inside the bounds, same text."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " * 30}
                for i in range(1000)]
    # It ends in an assistant turn: both default to no generation prompt.
    assert phi3.apply_chat_template(messages) == hf_phi3.apply_chat_template(
        messages, tokenize=False)
