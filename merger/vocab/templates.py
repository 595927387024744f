"""Chat templates a recipe can name (`chat_template: chatml | llama3 | alpaca | mistral`), `auto` (the
template most inputs share), or a Jinja template given inline; `resolve_template` checks it parses."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

BUILTIN: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n per message
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3: BOS, then a header per message and <|eot_id|> after its content
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Alpaca: an optional system preamble, then ### Instruction / ### Response blocks
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # Mistral instruct: [INST] ... [/INST] around user turns, EOS after each answer; a system message
    # is folded into the first user turn
    "mistral": (
        "{{ bos_token }}"
        "{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
        "{% set ns.system = '' %}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
    ),
}


class TemplateChoiceError(ValueError):
    """The recipe's chat_template is neither a known name nor a usable Jinja template."""


def most_common(templates: Iterable[str | None]) -> str | None:
    """`auto`: the template most inputs share (the earliest among equals), None when none has one."""
    found = [t.strip() for t in templates if t and t.strip()]
    return Counter(found).most_common(1)[0][0] if found else None


def resolve_template(value: str, input_templates: Iterable[str | None]) -> str | None:
    """The template text `chat_template: value` stands for (None: `auto` and no input has one)."""
    if value == "auto":
        return most_common(input_templates)
    if value in BUILTIN:
        return BUILTIN[value]
    if "{" not in value:
        raise TemplateChoiceError(f"unknown template {value!r}; use auto, {', '.join(BUILTIN)} or a Jinja template")
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(value)
    except TemplateSyntaxError as e:
        raise TemplateChoiceError(f"not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return value
