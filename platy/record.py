"""The record of a training run: run_config.json, written by finetune.py next to every adapter and in every
checkpoint, copied by merge.py into the merged folder, and read back by merge, inference, evaluation, the
model cards and the GGUF export.

RunRecord is the only reader of that file: consumers ask its properties ("the prompt template used", "how
the base was quantized") instead of digging through the nested dict. The file's layout stays as it always
was, so a record of any earlier version of the toolkit reads, and whatever a record holds writes back
unchanged (`RunRecord.from_dict(d).to_dict() == d`):

    {"flags": {...every flag...},
     "resolved": {"base_model_path", "model_type", "template", "precision", "device", "world_size",
                  "gradient_accumulation_steps", "lora_target_modules", "lora_scale" (LoRA runs), "resume",
                  "plan", then as training goes: "quantization_layout", "loftq", "chat_template", "reference"},
     "data": {"path", "fingerprint", "train", "val", ...}, "versions": {...}, "command": "python finetune.py ...",
     "result": {...} (a finished run only)}
"""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from platy.files import RUN_CONFIG, write_json


@dataclass(frozen=True)
class RecordedChatTemplate:
    """The chat template a run trained with (--chat_template): its name, file, the tokens that end a turn,
    the tokenizer length after its control tokens were added, the stop ids and the Jinja text."""

    name: str | None
    path: str | None = None
    end_of_turn: tuple = ()
    vocabulary: int | None = None
    eos_token_id: tuple = ()
    text: str = ""

    def to_dict(self):
        """As run_config.json's resolved.chat_template holds it."""
        return {
            "name": self.name,
            "path": self.path,
            "end_of_turn": list(self.end_of_turn),
            "vocabulary": self.vocabulary,
            "eos_token_id": list(self.eos_token_id),
            "text": self.text,
        }


@dataclass(frozen=True)
class PromptFormat:
    """How a run rendered its prompts: with a chat template (chat: its RecordedChatTemplate, the Jinja text
    by content), else with a prompt template (template: its name, path and content, as recorded). Every
    consumer (inference, evaluation, the merged tokenizer, the GGUF file, the Modelfile, the cards) follows it."""

    template: dict | None
    chat: RecordedChatTemplate | None

    @property
    def name(self):
        """The chat template's name, else the prompt template's (alpaca, ...)."""
        return self.chat.name if self.chat else (self.template or {}).get("name")

    def describe(self):
        """'the chat template chatml' or 'the prompt template alpaca', for messages."""
        return f"the {'chat' if self.chat else 'prompt'} template {self.name or 'of its run'}"


class RunRecord:
    """One run's run_config.json. Build it with the constructor (training), or read it with RunRecord.read."""

    def __init__(self, flags, resolved, data=None, versions=None, command=None, result=None):
        """flags: every flag by name; resolved: what the run decided (base_model_path, model_type, template,
        precision, ..., plan); data: the data stats (filled in later by set_data); versions: library versions;
        command: the command line as typed, None when the stages were called from Python; result: the
        finished run's figures (set_result)."""
        self._raw = {
            "flags": dict(flags),
            "resolved": dict(resolved),
            "data": dict(data or {}),
            "versions": dict(versions or {}),
            "command": command,
        }
        if result is not None:
            self._raw["result"] = dict(result)

    # ---- reading and writing ---------------------------------------------------------------------

    @classmethod
    def read(cls, folder):
        """The record in folder (an adapter, a checkpoint-N or a merged model), or None where the folder has
        none. A damaged file raises json.JSONDecodeError, as it always has."""
        path = Path(folder) / RUN_CONFIG
        if not path.is_file():
            return None
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_dict(cls, data):
        """The record of a run_config.json's content, kept as it is (unknown keys and their order too)."""
        record = cls.__new__(cls)
        record._raw = copy.deepcopy(dict(data))
        return record

    def to_dict(self):
        """The content of run_config.json, in its layout and key order (a copy)."""
        return copy.deepcopy(self._raw)

    def write(self, folder):
        """run_config.json in folder, written through a temporary file and a rename."""
        write_json(Path(folder) / RUN_CONFIG, self._raw)

    def __bool__(self):
        """Whether the record holds anything (an empty run_config.json holds nothing to copy or read)."""
        return bool(self._raw)

    def __repr__(self):
        return f"RunRecord(base_model={self.base_model!r}, finetuning={self.finetuning!r})"

    # ---- what training adds as it goes ----------------------------------------------------------

    def set_data(self, data):
        """The data stats (path, fingerprint, train and val counts) once the data sets are built."""
        self._raw["data"] = data

    def set_quantization_layout(self, layout):
        """How the base was quantized for training (None: not quantized)."""
        self._resolved_for_writing()["quantization_layout"] = layout

    def set_loftq(self, report):
        """LoftQ's report when the adapter was initialised: iterations and the quantization error before/after."""
        self._resolved_for_writing()["loftq"] = report

    def set_chat_template(self, chat):
        """The chat template the run trained with (a RecordedChatTemplate)."""
        self._resolved_for_writing()["chat_template"] = chat.to_dict()

    def set_reference(self, reference):
        """What a preference run compared its policy with: the model, and the fingerprint of its weights."""
        self._resolved_for_writing()["reference"] = reference

    def set_result(self, result):
        """The finished run's figures: global_step, losses, tokens, seconds; marks the run finished."""
        self._raw["result"] = result

    def _resolved_for_writing(self):
        return self._raw.setdefault("resolved", {})

    # ---- the sections, for the few readers that show them whole --------------------------------

    @property
    def _resolved(self):
        return self._raw.get("resolved") or {}

    @property
    def flags(self):
        """Every flag of the run by name, as recorded (a copy; {} when none are recorded)."""
        return dict(self._raw.get("flags") or {})

    def flag(self, name, default=None):
        """One recorded flag's value; default where the record does not hold it."""
        return (self._raw.get("flags") or {}).get(name, default)

    @property
    def versions(self):
        """The library versions the run used ({} when not recorded)."""
        return dict(self._raw.get("versions") or {})

    @property
    def command(self):
        """The command line as typed, or None (trained through the library, not finetune.py)."""
        return self._raw.get("command")

    # ---- the base model --------------------------------------------------------------------------

    @property
    def base_model(self):
        """--base_model as typed (a hub id, a path as given, builtin:NAME), or None."""
        return self.flag("base_model")

    @property
    def base_model_path(self):
        """Where the base was found on the training machine (resolved folder or hub id), or None."""
        return self._resolved.get("base_model_path")

    @property
    def model_type(self):
        """The base's model_type (llama, mistral, ...), or None."""
        return self._resolved.get("model_type")

    # ---- prompts -------------------------------------------------------------------------------

    @property
    def template(self):
        """The prompt template the run used, as recorded: name, path and its contents (prompt_input,
        prompt_no_input, response_split, ...); None where not recorded."""
        return copy.deepcopy(self._resolved.get("template")) or None

    @property
    def template_name(self):
        """The prompt template's name (alpaca, ...), or None where not recorded."""
        return (self._resolved.get("template") or {}).get("name")

    @property
    def chat_template(self):
        """The chat template actually used (a RecordedChatTemplate), or None for a run without one."""
        chat = self._resolved.get("chat_template")
        if not chat:
            return None
        return RecordedChatTemplate(
            name=chat.get("name"),
            path=chat.get("path"),
            end_of_turn=tuple(chat.get("end_of_turn") or ()),
            vocabulary=chat.get("vocabulary"),
            eos_token_id=tuple(chat.get("eos_token_id") or ()),
            text=chat.get("text") or "",
        )

    @property
    def prompt_format(self):
        """How the run rendered its prompts (a PromptFormat), or None where the record holds neither template.
        A checkpoint of a run with --chat_template records the template's text only when the run ends: its
        format is that chat template by name, with no text (the tokenizer saved beside it carries it)."""
        chat = self.chat_template
        named = self.flag("chat_template")
        if chat is None and named not in (None, "none"):
            chat = RecordedChatTemplate(name=named)
        if chat is None and self.template is None:
            return None
        return PromptFormat(self.template, chat)

    @property
    def vocabulary(self):
        """The tokenizer length the run recorded where it grew the vocabulary (a chat template's tokens
        added), else None."""
        chat = self.chat_template
        return chat.vocabulary if chat else None

    # ---- how the base was loaded --------------------------------------------------------------

    @property
    def quantization_layout(self):
        """How finetune.py quantized the base (quantization, quant_type, double_quant, modules...), or None."""
        return copy.deepcopy(self._resolved.get("quantization_layout")) or None

    @property
    def quantization(self):
        """How the base was quantized in training: '4bit', '8bit' or 'none'."""
        return (self._resolved.get("quantization_layout") or {}).get("quantization") or "none"

    @property
    def precision(self):
        """The compute precision of training (bf16, fp16, fp32), or None."""
        return self._resolved.get("precision")

    # ---- the adapter ---------------------------------------------------------------------------

    @property
    def finetuning(self):
        """'lora' or 'full' (records older than --finetuning are LoRA runs)."""
        return self.flag("finetuning") or "lora"

    @property
    def init_lora_weights(self):
        """--init_lora_weights (default, gaussian, pissa, olora, loftq, ...), or None where not recorded."""
        return self.flag("init_lora_weights")

    @property
    def lora_scale(self):
        """alpha / r (alpha / sqrt(r) with rsLoRA): the scale the merge applies; None for full fine-tuning."""
        return self._resolved.get("lora_scale")

    @property
    def lora_target_modules(self):
        """The adapted layers, all-linear resolved to names; None for full fine-tuning."""
        return copy.deepcopy(self._resolved.get("lora_target_modules"))

    @property
    def loftq(self):
        """LoftQ's report (iterations, relative_error_before, relative_error_after), or None."""
        return copy.deepcopy(self._resolved.get("loftq")) or None

    @property
    def loftq_iterations(self):
        """LoftQ's alternating steps (1 for every run without --loftq_iter > 1)."""
        return (self._resolved.get("loftq") or {}).get("iterations", 1)

    @property
    def has_loftq_offsets(self):
        """Whether loftq_offset.safetensors belongs beside this adapter (LoftQ with more than one iteration)."""
        return bool(self.loftq_iterations and self.loftq_iterations > 1)

    # ---- the objective -------------------------------------------------------------------------

    @property
    def stage(self):
        """--stage: sft (records older than preference tuning too), dpo, ipo, simpo or orpo."""
        return self.flag("stage") or "sft"

    @property
    def beta(self):
        """--beta of a preference run, or None for sft."""
        return None if self.stage == "sft" else self.flag("beta")

    @property
    def reference(self):
        """A preference run's reference (model, adapter, fingerprint), or None."""
        return copy.deepcopy(self._resolved.get("reference"))

    # ---- how it ran ----------------------------------------------------------------------------

    @property
    def strategy(self):
        """The parallel strategy the run used (single, ddp, zero2, ...), or None."""
        return (self._resolved.get("plan") or {}).get("strategy")

    # ---- the data ------------------------------------------------------------------------------

    @property
    def data(self):
        """The data stats as recorded ({} where none are): path, fingerprint, train, val."""
        return copy.deepcopy(self._raw.get("data") or {})

    @property
    def data_path(self):
        """--data_path as recorded with the data stats, or None."""
        return (self._raw.get("data") or {}).get("path")

    @property
    def data_fingerprint(self):
        """The fingerprint of the rows the run trained on, or None."""
        return (self._raw.get("data") or {}).get("fingerprint")

    @property
    def train_stats(self):
        """The training split's counts (kept, label_tokens, ...), or {}."""
        return copy.deepcopy((self._raw.get("data") or {}).get("train") or {})

    # ---- the result ----------------------------------------------------------------------------

    @property
    def finished(self):
        """Whether the run finished (its result is recorded); a checkpoint-N's record has none."""
        return "result" in self._raw

    @property
    def result(self):
        """The finished run's figures (global_step, train_loss, eval_loss, ...), or None."""
        return copy.deepcopy(self._raw.get("result"))

    @property
    def global_step(self):
        """The optimizer steps of the finished run, or None."""
        return (self._raw.get("result") or {}).get("global_step")
