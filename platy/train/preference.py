"""Preference tuning: the four losses, the batches of pairs, the Trainer that computes them, and the reference
log-probs computed once before training and cached.

Notation: for a pair of answers y_w (chosen) and y_l (rejected) to a prompt x, log pi(y|x) is the sum of the
answer tokens' log-probs (end-of-turn token included), |y| its token count, and the log-ratio
h(y) = log pi_theta(y|x) - log pi_ref(y|x). Each loss is the mean over the pairs of a micro-batch:

    dpo    -log sigmoid(beta (h(y_w) - h(y_l)))                          Rafailov et al. 2023, eq. 7
    ipo    (h(y_w)/|y_w| - h(y_l)/|y_l| - 1/(2 beta))^2                  Azar et al. 2023, eq. 17 (TRL's per-token form)
    simpo  -log sigmoid(beta (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)   Meng et al. 2024, eq. 6
    orpo   NLL(y_w) - lambda log sigmoid(log odds(y_w) - log odds(y_l)),      Hong et al. 2024, eqs. 6-7
           odds(y) = P(y)/(1 - P(y)), P(y) = exp(log pi(y)/|y|); NLL(y_w): the mean cross-entropy of y_w's tokens

SimPO and ORPO need no reference. The reward logged for a pair's answer is beta h(y) (dpo, ipo) or
beta log pi(y)/|y| (simpo, orpo), as TRL logs them.
"""

import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from platy.caches import cache_folder
from platy.cli import UserError, say
from platy.data.examples import IGNORE_INDEX
from platy.data.pairs import ANSWERS
from platy.files import ADAPTER_FILES, temp_beside
from platy.train.trainer import Trainer, answer_positions, every_rank, slices_logits_by_mask

WITH_REFERENCE = ("dpo", "ipo")  # the losses that compare the policy with a reference
# bump when what the cached reference log-probs hold changes; 2: the lm_head only at answer positions, which moves
# the float32 sums by a few ulps
REFERENCE_VERSION = 2
# the largest |log pi_theta - log pi_ref| per answer token at step 0 that still counts as "the same model": the
# reference and the first step see other batches (other padding), which moves float32 sums by ~1e-6
START_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


# ---- the losses --------------------------------------------------------------------------------------


def answer_logps(model, input_ids, attention_mask, labels, by_mask=None):
    """(sum of the answer tokens' log-probs, their count) per row; labels hold IGNORE_INDEX off the answer.

    The lm_head and the log-softmax run only at the positions that predict an answer token (transformers'
    logits_to_keep with a boolean mask, through peft and DDP wrappers alike, where slices_logits_by_mask allows
    it): over a 49k-token vocabulary they are a large share of a step, and prompt and padding positions enter no
    loss. Each kept position's logits are the ones a full forward computes there, so the sums are the same.
    by_mask: slices_logits_by_mask(model), when the caller has it already."""
    keep = answer_positions(labels)
    if by_mask is None:
        by_mask = slices_logits_by_mask(model)
    mask = {"logits_to_keep": keep} if by_mask else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **mask).logits.float()
    if logits.dim() == 3:  # every position's logits (a model that cannot take the mask)
        logits = logits[keep.to(logits.device)]
    targets = labels[:, 1:][keep[:, :-1]].to(logits.device)
    per_token = torch.gather(logits, 1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=1)
    counts = keep.sum(dim=1)
    rows = torch.repeat_interleave(torch.arange(len(labels), device=logits.device), counts.to(logits.device))
    return per_token.new_zeros(len(labels)).index_add(0, rows, per_token), counts


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def preference_loss(stage, beta, gamma, chosen, rejected, ref_chosen=None, ref_rejected=None):
    """(loss, chosen rewards, rejected rewards) of a micro-batch. chosen and rejected are (sum of log-probs, token
    count) per pair; ref_*: the reference's sums (dpo, ipo). ORPO's NLL term is added by the caller."""
    (logp_w, n_w), (logp_l, n_l) = chosen, rejected
    if stage in WITH_REFERENCE:
        ratio_w, ratio_l = logp_w - ref_chosen, logp_l - ref_rejected
        if stage == "dpo":
            losses = -F.logsigmoid(beta * (ratio_w - ratio_l))
        else:
            losses = (ratio_w / n_w.clamp(min=1) - ratio_l / n_l.clamp(min=1) - 1 / (2 * beta)) ** 2
        return losses.mean(), beta * ratio_w.detach(), beta * ratio_l.detach()
    mean_w, mean_l = logp_w / n_w.clamp(min=1), logp_l / n_l.clamp(min=1)
    if stage == "simpo":
        losses = -F.logsigmoid(beta * (mean_w - mean_l) - gamma)
    elif stage == "orpo":
        log_odds = (mean_w - mean_l) - (log1mexp(mean_w) - log1mexp(mean_l))
        losses = -beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"no preference loss for stage {stage!r}")
    return losses.mean(), beta * mean_w.detach(), beta * mean_l.detach()


def starting_loss(stage, beta):
    """The loss when the policy equals its reference: ln 2 (dpo), 1/(4 beta^2) (ipo)."""
    return math.log(2) if stage == "dpo" else (1 / (2 * beta)) ** 2


def pair_loss(model, inputs, stage, beta, gamma, check=None, by_mask=None):
    """(loss, chosen rewards, rejected rewards) of a PairCollator batch: the policy's log-probs of both answers
    in one forward pass, the reference's from the batch (dpo, ipo). check(chosen, rejected, ref_chosen,
    ref_rejected, rows), when given, sees the log-probs before the loss."""
    pairs = inputs["row"].shape[0]
    logps, counts = answer_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], by_mask)
    chosen, rejected = (logps[:pairs], counts[:pairs]), (logps[pairs:], counts[pairs:])
    ref_chosen = ref_rejected = None
    if stage in WITH_REFERENCE:
        ref_chosen = inputs["ref_chosen_logps"].to(logps.dtype)
        ref_rejected = inputs["ref_rejected_logps"].to(logps.dtype)
        if check is not None:
            check(chosen, rejected, ref_chosen, ref_rejected, inputs["row"])
    loss, reward_w, reward_l = preference_loss(stage, beta, gamma, chosen, rejected, ref_chosen, ref_rejected)
    if stage == "orpo":  # the supervised term on the chosen answers: their tokens' mean cross-entropy
        loss = loss - chosen[0].sum() / chosen[1].sum().clamp(min=1)
    return loss, reward_w, reward_l


# ---- batches -----------------------------------------------------------------------------------------


class PairCollator:
    """A micro-batch of pairs as one batch of 2B rows, the chosen answers first, right-padded (labels with
    IGNORE_INDEX); the pairs' cached reference log-probs and row numbers ride along."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, features):
        rows = [(f[f"{key}_input_ids"], f[f"{key}_labels"]) for key in ("chosen", "rejected") for f in features]
        width = max(len(ids) for ids, _ in rows)
        width += -width % 8  # tensor-core friendly, as the supervised collator pads
        batch = {
            "input_ids": torch.tensor([ids + [self.pad_id] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in rows]),
            "row": torch.tensor([f["row"] for f in features]),
        }
        if "ref_chosen_logps" in features[0]:
            batch["ref_chosen_logps"] = torch.tensor([f["ref_chosen_logps"] for f in features], dtype=torch.float64)
            batch["ref_rejected_logps"] = torch.tensor([f["ref_rejected_logps"] for f in features], dtype=torch.float64)
        return batch


# ---- the Trainer -------------------------------------------------------------------------------------


class PreferenceTrainer(Trainer):
    """The fault-handling Trainer computing a preference loss: the policy's log-probs of both answers in one
    forward pass, the reference's read from the batch (cached before training). The first micro-batch of a new
    run checks that the policy starts as its reference (dpo, ipo)."""

    def __init__(self, *args, stage, beta, simpo_gamma, precision, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage, self.beta, self.gamma = stage, beta, simpo_gamma
        self.tolerance = START_TOLERANCE[precision]
        # the loss is a mean over pairs: the Trainer averages it over the micro-steps of an optimizer step
        self.model_accepts_loss_kwargs = False
        self.start_checked = False
        self.sums = {"train": dict.fromkeys(METRICS, 0.0), "eval": dict.fromkeys(METRICS, 0.0)}
        self.counts = {"train": 0, "eval": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        check = self.stage in WITH_REFERENCE and model.training and not self.start_checked
        loss, reward_w, reward_l = pair_loss(
            model,
            inputs,
            self.stage,
            self.beta,
            self.gamma,
            self.check_start if check else None,
            by_mask=self.logits_at_labels_only,
        )
        self.note(model.training, reward_w, reward_l)
        return (loss, None) if return_outputs else loss

    def check_start(self, chosen, rejected, ref_chosen, ref_rejected, rows):
        """At the first step of a new run the policy is its reference: each answer's log-ratio is 0 (within the
        precision's rounding), so the loss is ln 2 (dpo) and the rewards 0. Anything else stops the run."""
        self.start_checked = True
        if self.state.global_step > 0:  # resumed: the policy has trained
            return
        largest = 0.0
        for (logp, count), ref in ((chosen, ref_chosen), (rejected, ref_rejected)):
            per_token = (logp.detach() - ref).abs() / count.clamp(min=1)
            worst = int(per_token.argmax())
            largest = max(largest, float(per_token[worst]))
            if per_token[worst] > self.tolerance:
                raise UserError(
                    f"--stage {self.stage}: the reference is not the starting policy: at step 0 the policy's "
                    f"log-prob of row {int(rows[worst])}'s answer differs from the reference's by "
                    f"{per_token[worst]:.2g} per token (allowed {self.tolerance:g}), so the loss does not start at "
                    f"{starting_loss(self.stage, self.beta):.4f}. The adapter, its initialisation, dropout or the "
                    "template differ from the reference's; start from --init_adapter's adapter with "
                    "--init_lora_weights default"
                )
        say(
            f"Step 0: the policy is its reference (log-ratios within {largest:.1g} per token): the loss starts at "
            f"{starting_loss(self.stage, self.beta):.4f}{' = ln 2' if self.stage == 'dpo' else ''}, the rewards at 0"
        )

    def note(self, training, reward_w, reward_l):
        mode = "train" if training else "eval"
        sums = self.sums[mode]
        margin = reward_w - reward_l
        sums["rewards/chosen"] += reward_w.sum().item()
        sums["rewards/rejected"] += reward_l.sum().item()
        sums["rewards/margins"] += margin.sum().item()
        # a tie (every pair at step 0) counts half: a policy that cannot tell the answers apart scores 50%
        sums["rewards/accuracies"] += ((margin > 0).float() + 0.5 * (margin == 0).float()).sum().item()
        self.counts[mode] += len(reward_w)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs, start_time=None):
        """The logged loss with the mean rewards of the pairs since the last log (eval_ ones after evaluation)."""
        mode, prefix = ("eval", "eval_") if "eval_loss" in logs else ("train", "")
        # every rank logs (the Trainer gathers the loss the same way): the pairs of all ranks count
        mine = [*self.sums[mode].values(), float(self.counts[mode])]
        totals = [sum(column) for column in zip(*every_rank(mine))]
        if totals[-1] > 0:
            logs.update({prefix + name: total / totals[-1] for name, total in zip(METRICS, totals)})
        self.sums[mode] = dict.fromkeys(METRICS, 0.0)
        self.counts[mode] = 0
        super().log(logs, start_time)


# ---- the reference ----------------------------------------------------------------------------------


def reference_of(run):
    """What the reference is, for the record and the cache key: the SFT adapter (--init_adapter, its weights'
    hash) on the base, or the base with the adapter disabled."""
    base = {"base_model": run.base_model, "quantization": run.quantization, "precision": run.precision}
    if run.init_adapter:
        adapter = adapter_fingerprint(run.init_adapter)
        return {"model": "the frozen SFT adapter on the base", "adapter": run.init_adapter, **base, **adapter}
    return {"model": "the base (adapter disabled)", **base, **base_fingerprint(run.base_model_path)}


def base_fingerprint(path):
    """The base's weight files by name, size and modification time: enough to tell one download from another
    without reading gigabytes."""
    folder = Path(path)
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    listing = [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]
    return {"base_files": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}


def adapter_fingerprint(folder):
    """sha256 of the adapter's weights file."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = Path(folder) / name
        if path.is_file():
            digest.update(path.read_bytes())
    return {"adapter_sha256": digest.hexdigest()}


def reference_key(reference, dataset):
    """The cache key of a reference's log-probs: the reference (its weights, quantization and precision) and the
    token ids and labels it scores, in order. Whatever renders, cuts or splits the pairs otherwise (the data, the
    template or chat template and its file, the tokenizer, cutoff_len, the seed) gives other ids; beta is in
    neither, so every beta reuses them."""
    digest = hashlib.sha256(json.dumps([REFERENCE_VERSION, reference], sort_keys=True, default=str).encode())
    for key in ANSWERS:
        for column in (f"{key}_input_ids", f"{key}_labels"):
            digest.update(json.dumps(list(dataset[column])).encode())
    return digest.hexdigest()[:32]


def reference_logps(model, dataset, collator, batch_size, use_adapter, precision="fp32"):
    """(chosen, rejected) float64 tensors: the reference's summed answer log-probs of every pair, in order.
    Computed as the first training step computes: in training mode with dropout off (on CPU a 4-bit layer in
    eval mode computes through another kernel), under the autocast accelerate puts around the training forward
    in bf16 or fp16, and without gradients."""
    import contextlib

    chosen, rejected = [], []
    was_training = model.training
    model.train()
    context = contextlib.nullcontext() if use_adapter else model.disable_adapter()
    device = next(model.parameters()).device
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=half) if half else contextlib.nullcontext()
    by_mask = slices_logits_by_mask(model)
    with torch.no_grad(), context, autocast:
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            pairs = batch["row"].shape[0]
            logps, _ = answer_logps(
                model,
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["labels"].to(device),
                by_mask,
            )
            chosen.append(logps[:pairs].double().cpu())
            rejected.append(logps[pairs:].double().cpu())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def cached_reference(key, compute, label):
    """The reference log-probs of the cache entry key (reused), or computed and cached; says which."""
    from safetensors.torch import load_file, save_file

    path = cache_folder("reference") / f"{key}.safetensors"  # private, as every cache the toolkit reads back
    if path.is_file():
        saved = load_file(str(path))
        say(
            f"Reference log-probs ({label}): reused from {path} ({len(saved['chosen'])} pairs; same reference, data, "
            "template and cutoff_len)"
        )
        return saved["chosen"], saved["rejected"]
    started = time.time()
    chosen, rejected = compute()
    partial = temp_beside(path)
    try:
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(partial))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    say(
        f"Reference log-probs ({label}): computed for {len(chosen)} pairs in {time.time() - started:.1f} s, cached in "
        f"{path}"
    )
    return chosen, rejected


def disable_dropout(model):
    """Every dropout of the model off: the policy must compute what the reference computed."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
