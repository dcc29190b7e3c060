"""Alpaca-LoRA style prompt templates from templates/*.json, found next to the code."""

import json
from pathlib import Path

from platy.cli import REPO_ROOT, UserError

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
