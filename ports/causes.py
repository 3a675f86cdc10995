"""The traced causes of the divergences the matrix shows: for each, the releases it applies to, the
cases and first-failure lines it explains, and the release source line that computes it (found by
`pattern` in that release's own site-packages when the matrix is written, so the line number is the
release's). Traced by diffing each release's AdaLoRA source against 0.21.2's (ports/README.md)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Cause:
    key: str
    title: str
    releases: tuple[str, ...]  # row names ("peft 0.4.0") it applies to
    cases: tuple[str, ...]  # case id globs
    first_failure: str  # a regex the runner's first failure line must match ("" matches any)
    file: str  # the release's file, relative to site-packages
    pattern: str  # a fragment of the causing line, located in the release's file
    quote: str  # the line, in a few words
    why: str
    other_files: tuple[str, ...] = field(default=())  # where the file moved in other releases


def _rows(*versions: str) -> tuple[str, ...]:
    return tuple(f"peft {v}" for v in versions)


ADALORA_PY = "peft/tuners/adalora.py"  # 0.4, 0.5: AdaLoRA in one module
LORALIB = ("loralib (authors)",)  # traced by the loralib driver's author: ports/loralib/FINDINGS.md D1-D5
LORALIB_ADALORA = "loralib/loralib/adalora.py"  # paths in a checkout of QingruZhang/AdaLoRA
CAUSES: list[Cause] = [
    Cause(
        "dropout_zero_crash",
        "no layer without dropout can be built",
        _rows("0.4.0"),
        ("*",),
        r"is not a Module subclass",
        ADALORA_PY,
        "self.lora_dropout.update(nn.ModuleDict({adapter_name: lora_dropout_layer}))",
        "self.lora_dropout.update(nn.ModuleDict({adapter_name: lora_dropout_layer}))",
        "With lora_dropout 0 the dropout is a plain function (`def lora_dropout_layer(x): return x`, a few "
        "lines above), which torch.nn.ModuleDict refuses: every case without dropout raises while peft builds "
        "its layers. 0.5.0 makes it `nn.Identity()`.",
    ),
    Cause(
        "unmerge_transpose",
        "unmerge raises",
        _rows("0.4.0", "0.5.0"),
        ("layer/*",),
        r"transpose\(\) missing",
        ADALORA_PY,
        "self.weight.data -= (",
        "self.weight.data -= (transpose(self.lora_B @ (self.lora_A * self.lora_E)) * ...)",
        "SVDLinear.unmerge calls `transpose` without its `fan_in_fan_out` argument (merge, just above, "
        "passes it), so every unmerge raises TypeError; 0.6 passes it.",
    ),
    Cause(
        "E_init_normal",
        "E starts random, not at zero",
        _rows("0.5.0", "0.6.2", "0.9.0"),
        ("init/default",),
        r"initial lora_E differs",
        "peft/tuners/adalora/layer.py",
        "nn.init.normal_(self.lora_E[adapter_name], mean=0.0, std=0.02)",
        "nn.init.normal_(self.lora_E[adapter_name], mean=0.0, std=0.02)",
        "reset_lora_parameters draws E from N(0, 0.02) like A and B, so the adapted model does not start "
        "equal to the base model; from 0.12 (and in 0.21.2) it is `nn.init.zeros_(self.lora_E[...])`.",
        (ADALORA_PY,),
    ),
    Cause(
        "r_zero_refused",
        "r = 0 refused",
        _rows("0.9.0"),
        ("*",),
        r"should be a positive integer value",
        "peft/tuners/adalora/layer.py",
        "should be a positive integer value but the value passed is",
        'if r <= 0: raise ValueError(f"`r` should be a positive integer value ...")',
        "update_layer refuses a layer of rank 0 (a layer fully pruned, an adapter saved with r = 0); 0.12 on "
        "accept it (`if r < 0`, 'a positive integer or 0').",
    ),
    Cause(
        "orth_zero_refused",
        "orth_reg_weight = 0 raises in the forward",
        _rows("0.5.0", "0.6.2", "0.9.0", "0.12.0", "0.15.2", "0.18.1"),
        ("trajectory/orth_zero_64",),
        r"orth_reg_weight should be greater than 0",
        "peft/tuners/adalora/model.py",
        "if orth_reg_weight <= 0:",
        'if orth_reg_weight <= 0: raise ValueError("orth_reg_weight should be greater than 0. ")',
        "AdaLoraModel.forward refuses to run with the orthogonal term switched off (0.4.0 asserts it); "
        "0.21.2 accepts orth_reg_weight 0 and adds nothing.",
        (ADALORA_PY,),
    ),
    Cause(
        "lora_only_not_trained",
        'bias "lora_only" trains no bias',
        _rows("0.9.0"),
        ("trajectory/bias_lora_only_64",),
        r"^loss at step 2 ",
        "peft/tuners/lora/model.py",
        'if isinstance(m, LoraLayer) and hasattr(m, "bias") and m.bias is not None:',
        'if isinstance(m, LoraLayer) and hasattr(m, "bias") and m.bias is not None: m.bias.requires_grad = True',
        "The SVD layer has wrapped its base layer since 0.7 and has no `bias` of its own, so no bias is freed: "
        "the loss departs at step 2, the first forward after an optimizer step. 0.12 frees the base layer's bias.",
    ),
    Cause(
        "lora_only_not_saved",
        'bias "lora_only": the trained biases are not saved',
        _rows("0.12.0", "0.15.2", "0.18.1"),
        ("trajectory/bias_lora_only_64",),
        r"saved tensor of .*base_layer\.bias: missing",
        "peft/utils/save_and_load.py",
        'bias_name = k.split("lora_")[0] + "bias"',
        'bias_name = k.split("lora_")[0] + "bias"; if bias_name in state_dict: ...',
        "get_peft_model_state_dict looks for `fc1.bias` beside `fc1.lora_A.default`, but since 0.7 the bias is "
        "`fc1.base_layer.bias`: training matches 0.21.2 to the last step, and save_pretrained leaves the trained "
        "biases out.",
    ),
    Cause(
        "target_modules_list",
        "target_modules saved in the order given",
        _rows("0.4.0", "0.5.0", "0.6.2", "0.9.0"),
        ("config/*",),
        r"target_modules\[0\]",
        "peft/tuners/adalora/config.py",
        "self.peft_type = PeftType.ADALORA",
        "def __post_init__(self): self.peft_type = PeftType.ADALORA",
        'AdaLoraConfig.__post_init__ only sets peft_type: a list target_modules stays as given (["v", "q"]) '
        "and is saved so; from 0.12 it becomes a set, which the golden values hold sorted (SPEC 14.9). The "
        "adapter targets the same modules either way.",
        (ADALORA_PY,),
    ),
    Cause(
        "total_step_unchecked",
        "a config without total_step accepted",
        _rows("0.12.0"),
        ("config/*",),
        r"accepted of entry 5 is true",
        "peft/tuners/adalora/config.py",
        "self.peft_type = PeftType.ADALORA",
        "__post_init__: no check of total_step, tinit, tfinal or orth_reg_weight",
        "AdaLoraConfig accepts a missing total_step (peft then fails at the first budget_schedule); 0.15 raises "
        "`AdaLoRA does not work when total_step is None`.",
    ),
    Cause(
        "orth_weight_negative_accepted",
        "a negative orth_reg_weight accepted",
        _rows("0.15.2", "0.18.1"),
        ("config/*",),
        r"accepted of entry 10 is true",
        "peft/tuners/adalora/config.py",
        "if self.tinit >= (self.total_step - self.tfinal):",
        "__post_init__ checks total_step, tinit and tfinal, not orth_reg_weight",
        "orth_reg_weight -0.1 is accepted (and the forward raises later); 0.21.2 refuses it in the config "
        "(`if self.orth_reg_weight < 0: raise ValueError`).",
    ),
    Cause(
        "layers_pattern_needs_a_dot",
        "a layers_pattern at the start of a name is not found",
        _rows("0.15.2", "0.18.1"),
        ("targeting/*",),
        r"targeted modules of entry 12 ",
        "peft/tuners/tuners_utils.py",
        'layer_index = re.match(rf".*\\.{pattern}\\.(\\d+)\\.", key)',
        'layer_index = re.match(rf".*\\.{pattern}\\.(\\d+)\\.", key)',
        "The layer index is looked for only after a dot and the pattern, so `blocks.0.q` (the pattern at the "
        "start of the name) has no index and is not targeted; 0.21.2 also matches the pattern at the start.",
    ),
    Cause(
        "loralib_steps_from_0",
        "steps counted from 0: the whole schedule runs one step late",
        LORALIB,
        ("allocator/*", "trajectory/*"),
        r"^budget at step \d+ is ",
        "NLU/src/transformers/trainer.py",
        "self.rankallocator.update_and_mask(self.model, self.state.global_step)",
        "self.rankallocator.update_and_mask(self.model, self.state.global_step)",
        "The authors' trainer calls update_and_mask before `self.state.global_step += 1` (three lines on), so "
        "the allocator sees steps from 0 where peft's are counted from 1 (SPEC 16.2; the runner names it, "
        "18.14); the from_step_0 cases, where the counts agree, pass these checks (ports/loralib/FINDINGS.md, D1).",
    ),
    Cause(
        "loralib_checkpoint_not_cut",
        "the saved adapter is not cut to the rank pattern",
        LORALIB,
        ("trajectory/*",),
        r"^saved tensor of .* has shape",
        "loralib/loralib/utils.py",
        "if 'lora_' in k}",
        "return {k: my_state_dict[k] for k in my_state_dict if 'lora_' in k}",
        "lora_state_dict saves every row of each triplet (the pruned E rows zeroed); peft's save_pretrained "
        "cuts A, E and B to the stored pattern (SPEC 8.2) (FINDINGS.md, D3).",
    ),
    Cause(
        "loralib_zero_rank_layer",
        "a layer of rank 0 has no tensors and is left out of the budget",
        LORALIB,
        ("allocator/r_zero_layer_64",),
        r"empty\.lora_A at step 1: missing",
        LORALIB_ADALORA,
        "if r > 0:",
        "if r > 0: (lora_A, lora_E, lora_B, scaling, ranknum created only here)",
        "SVDLinear(r=0) has no triplet, so its importance and E have no counterpart and the target budget "
        "counts 2 layers, not 3 (FINDINGS.md, D4).",
    ),
    Cause(
        "loralib_orth_divides_by_zero",
        "the orthogonal term divides by zero without triplets",
        LORALIB,
        ("orth/r_zero_f64",),
        r"^no outputs",
        LORALIB_ADALORA,
        "return regu_weight*regu_loss/num_param",
        "return regu_weight*regu_loss/num_param",
        "compute_orth_regu raises ZeroDivisionError when no lora_A / lora_B exists (every r = 0); peft returns "
        "0 (FINDINGS.md, D5).",
    ),
]


def causes_for(row: str, case_id: str, first_line: str) -> Cause | None:
    """The first cause that applies to `row` and explains `case_id`'s failure, if any."""
    for cause in CAUSES:
        applies = row in cause.releases and any(fnmatch.fnmatchcase(case_id, g) for g in cause.cases)
        if applies and re.search(cause.first_failure, first_line):
            return cause
    return None
