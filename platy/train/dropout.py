"""LoRA's dropout with a cheaper mask on a CPU.

A CPU draws random numbers one element at a time (about 5 ns each on a server core), so the dropout peft applies
to the input of every adapted layer costs a few percent of a step of a small model. This mask takes 16 random
bits per element, four elements from each 64-bit draw; the drop probability is rounded to a multiple of 1/65536
(0.05 becomes 0.0500031), and the kept values are scaled by the inverse of the rounded keep probability, so the
expected output is the input, as with torch's dropout.
"""

import torch

LEVELS = 1 << 16


class WideDrawDropout(torch.nn.Dropout):
    """torch.nn.Dropout whose mask takes 16 bits per element from 64-bit random draws."""

    def forward(self, x):
        dropped = round(self.p * LEVELS)
        if not self.training or dropped == 0:
            return x
        if dropped == LEVELS:
            return torch.zeros_like(x)
        n = x.numel()
        draws = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        bits = draws.view(torch.int16)[:n].view(x.shape)  # uniform over -32768..32767
        keep = bits >= dropped - LEVELS // 2
        return x * keep * (LEVELS / (LEVELS - dropped))


def cheaper_lora_dropout(model):
    """Replace the nn.Dropout of every LoRA layer with WideDrawDropout of the same p."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if type(dropout) is torch.nn.Dropout:
                    dropouts[name] = WideDrawDropout(dropout.p)
