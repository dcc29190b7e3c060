"""Alpaca-LoRA style prompt templates from templates/*.json, found next to the code."""

import json
import re
from pathlib import Path

from platy.cli import REPO_ROOT, UserError
from platy.files import write_json, write_text

TEMPLATES_DIR = Path(REPO_ROOT) / "templates"
TEMPLATE_KEYS = ("description", "prompt_input", "prompt_no_input", "response_split")


def available_templates():
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.json"))


class Prompter:
    """Builds prompts from one template and cuts model output at its response_split."""

    def __init__(self, template_name="alpaca", flag="--prompt_template_name"):
        path = Path(template_name)
        if path.suffix == ".json" and not path.is_file():
            raise UserError(f"{flag}: template file not found: {template_name}")
        if path.suffix != ".json":  # a bare name means one of the shipped templates
            path = TEMPLATES_DIR / f"{template_name}.json"
        if not path.is_file():
            raise UserError(
                f"{flag}: unknown template '{template_name}'; "
                f"choose one of {', '.join(available_templates())} or give a path to a .json template"
            )
        try:
            template = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"template {path}: not readable JSON ({err}); fix the file") from err
        missing = [k for k in TEMPLATE_KEYS if not isinstance(template.get(k), str)]
        if missing:
            raise UserError(
                f"template {path}: missing string field(s) {', '.join(missing)}; "
                f"a template needs {', '.join(TEMPLATE_KEYS)}"
            )
        self.name = path.stem
        self.path = path
        self.template = template

    @classmethod
    def recorded(cls, template, flag):
        """The Prompter of a template as a run record holds it (name, path and content): the content the run
        trained with, wherever its file is now. A record without the content reads the file by name."""
        if not all(isinstance(template.get(key), str) for key in TEMPLATE_KEYS):
            return cls(template.get("name") or "alpaca", flag)
        prompter = cls.__new__(cls)
        prompter.name, prompter.path = template.get("name"), template.get("path")
        prompter.template = {key: template[key] for key in TEMPLATE_KEYS}
        return prompter

    def generate_prompt(self, instruction, input=None, label=None):
        """The prompt for one example; with `label`, the prompt followed by the response text."""
        if input:
            text = self.template["prompt_input"].format(instruction=instruction, input=input)
        else:
            text = self.template["prompt_no_input"].format(instruction=instruction)
        if label:
            text = f"{text}{label}"
        return text

    def get_response(self, output):
        """The part of a generated text after the template's response marker."""
        return output.split(self.template["response_split"], 1)[-1].strip()


def alpaca_chat_template(template, bos):
    """A prompt template (its prompt_input and prompt_no_input) written as a Jinja chat template that renders a
    conversation as training laid it out: a system message is the first exchange's instruction and its question
    the input; a question without one fills prompt_no_input; each answer ends with EOS. bos: whether the tokenizer
    starts a text with BOS (the template writes it, as chat templates do). Chat clients, vLLM, llama.cpp and
    Ollama then format the model's prompts the way it was trained."""
    import string

    def filled(form, fields):
        parts = []
        for literal, field, _, _ in string.Formatter().parse(template[form]):
            if literal:  # a JSON string is a Jinja string literal (non-ASCII and escapes included)
                parts.append("{{ " + json.dumps(literal, ensure_ascii=False) + " }}")
            if field is not None:
                parts.append("{{ " + fields[field] + " }}")
        return "".join(parts)

    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        + ("{{- bos_token -}}" if bos else "")
        + "{%- for message in turns -%}{%- if message['role'] == 'user' -%}"
        "{%- if loop.first and system | trim -%}"
        + filled("prompt_input", {"instruction": "system", "input": "message['content']"})
        + "{%- else -%}"
        + filled("prompt_no_input", {"instruction": "message['content']"})
        + "{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    )


def format_chat_template(prompt_format, bos):
    """The Jinja chat template that renders prompts as a run did (prompt_format: the record's PromptFormat): its
    chat template, or its prompt template written as one (alpaca_chat_template); None for a chat template the
    record names without its text (the tokenizer saved beside it carries it)."""
    if prompt_format.chat:
        return prompt_format.chat.text or None
    return alpaca_chat_template(prompt_format.template, bos)


CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a tokenizer's chat template


def save_chat_template(folder, text):
    """Make text the chat template of the tokenizer saved in folder: chat_template.jinja, and none left in
    tokenizer_config.json, which gguf's reader (and older transformers) would take first."""
    config = Path(folder) / "tokenizer_config.json"
    if config.is_file():
        settings = json.loads(config.read_text(encoding="utf-8"))
        if settings.pop("chat_template", None) is not None:
            write_json(config, settings)
    write_text(Path(folder) / CHAT_TEMPLATE_FILE, text)


# ---- chat templates: templates/*.jinja, the base tokenizer's own, or a Jinja file ------------

CHAT_TEMPLATE_NONE = "none"  # the Alpaca templates above, the Platypus behaviour
CHAT_TEMPLATE_AUTO = "auto"  # the base tokenizer's own chat_template
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def available_chat_templates():
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def chat_template_problem(spec, flag="--chat_template"):
    """A problem with a --chat_template value that needs no tokenizer, or None."""
    if not isinstance(spec, str) or not spec.strip():
        return f"{flag}: give none, auto, one of {', '.join(available_chat_templates())} or a path to a .jinja file"
    if spec in (CHAT_TEMPLATE_NONE, CHAT_TEMPLATE_AUTO) or (TEMPLATES_DIR / f"{spec}.jinja").is_file():
        return None
    if Path(spec).suffix in (".jinja", ".j2") or "/" in spec:
        return None  # a file: ChatTemplate.resolve reads it
    return (
        f"{flag}: unknown chat template '{spec}'; choose none, auto, "
        f"{', '.join(available_chat_templates())} or give a path to a .jinja file"
    )


class ChatTemplate:
    """A Jinja chat template, rendered by the tokenizer's apply_chat_template.

    name: the --chat_template value's name (a shipped template's stem, 'auto', or the file's stem);
    text: the Jinja source; end_of_turn: the control tokens that close an assistant turn, read
    from the template's own rendering (see end_of_turn_tokens), set by bind.
    """

    def __init__(self, name, text, path=None):
        self.name, self.text, self.path = name, text, path
        self.end_of_turn = ()
        self.prompts_always = False  # the template appends the generation prompt to every rendering (see bind)
        self.added = []  # control tokens bind added to the tokenizer

    @classmethod
    def resolve(cls, spec, tokenizer, flag="--chat_template"):
        """The ChatTemplate a --chat_template value names, or None for 'none'."""
        if spec == CHAT_TEMPLATE_NONE:
            return None
        if spec == CHAT_TEMPLATE_AUTO:
            text = getattr(tokenizer, "chat_template", None)
            if isinstance(text, dict):  # several named templates: the default one
                text = text.get("default")
            if not text:
                raise UserError(
                    f"{flag} auto: the base model's tokenizer has no chat_template; choose one of "
                    f"{', '.join(available_chat_templates())}, a path to a .jinja file, or none"
                )
            return cls("auto", text)
        problem = chat_template_problem(spec, flag)
        if problem:
            raise UserError(problem)
        path = TEMPLATES_DIR / f"{spec}.jinja"
        path = path if path.is_file() else Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"{flag}: template file not found: {spec}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{flag}: cannot read {path} ({err}); fix the file") from err
        return cls(path.stem, text, str(path))

    def control_tokens(self):
        """The <|name|> tokens the template writes, in order of first appearance."""
        return list(dict.fromkeys(CONTROL_TOKEN.findall(self.text)))

    def render(self, tokenizer, conversations, add_generation_prompt=False):
        """The texts of a batch of conversations (lists of role/content dicts)."""
        try:
            return tokenizer.apply_chat_template(
                conversations, chat_template=self.text, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # a Jinja error (or the template's raise_exception) is the template's fault
            raise UserError(f"chat template {self.path or self.name}: cannot render a conversation ({err})") from err

    def bind(self, tokenizer):
        """Add the template's control tokens the tokenizer lacks (as special tokens), make the template the
        tokenizer's, and read the end-of-turn tokens. Returns the tokens added."""
        vocab = tokenizer.get_vocab()
        missing = [token for token in self.control_tokens() if token not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        tokenizer.chat_template = self.text
        self.read_turns(tokenizer)
        return missing

    def read_turns(self, tokenizer):
        """Read the end-of-turn tokens, and whether the generation prompt follows every rendering (the first
        Meta-Llama-3-Instruct release wrote its assistant header whatever add_generation_prompt said)."""
        self.prompts_always = prompts_always(self, tokenizer)
        self.end_of_turn = end_of_turn_tokens(self, tokenizer)

    def end_of_turn_ids(self, tokenizer):
        return [tokenizer.convert_tokens_to_ids(token) for token in self.end_of_turn]


PROBE = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def prompts_always(template, tokenizer):
    """Whether the template appends its generation prompt to every rendering: then the rendering of a
    conversation does not start with the rendering of its first turns, which ends with that prompt."""
    whole = template.render(tokenizer, [PROBE])[0]
    longer = template.render(tokenizer, [PROBE + [{"role": "user", "content": "Q2"}]])[0]
    return not longer.startswith(whole)


def end_of_turn_tokens(template, tokenizer):
    """The special tokens that close an assistant turn: the tokens of what the template writes after an
    assistant's content (the rendering of a conversation ending with that turn, less the rendering up to
    its content) that are special or added tokens. Empty where the template closes a turn with plain text.
    Where the template appends the generation prompt to every rendering, that text follows too: the turn
    ends with the first special token after the content, and a template that writes none there cannot
    mark where its assistant turns end."""
    whole = template.render(tokenizer, [PROBE])[0]
    prefix = template.render(tokenizer, [PROBE[:1]], add_generation_prompt=True)[0]
    if not whole.startswith(prefix) or PROBE[1]["content"] not in whole[len(prefix) :]:
        raise UserError(
            f"chat template {template.path or template.name}: the assistant turn's rendering does not follow its "
            "generation prompt; the template cannot mark which tokens are the assistant's"
        )
    closing = whole[len(prefix) + whole[len(prefix) :].index(PROBE[1]["content"]) + 1 :]
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    ids = tokenizer(closing, add_special_tokens=False)["input_ids"]
    tokens = tuple(dict.fromkeys(t for t in tokenizer.convert_ids_to_tokens(ids) if t in special))
    if template.prompts_always and not tokens:
        raise UserError(
            f"chat template {template.path or template.name}: it appends the generation prompt to every rendering "
            "and closes an assistant turn with no special token; the template cannot mark where a turn ends"
        )
    return tokens[:1] if template.prompts_always else tokens
