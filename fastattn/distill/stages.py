"""What each GenDistill stage computes: its data, its trainable parameters and its loss.

* Stage 1 — per-layer alignment. For every student layer whose mixer differs from the teacher's (the
  new ``kda``/``eva`` mixers), the student mixer gets the teacher's own normalised input to that layer's
  attention (``teacher.layers[i].input_layernorm(h_i)``, captured from one frozen teacher forward; the
  student's input norm holds the same copied weights and does not train in this stage) and is trained to
  reproduce the teacher mixer's output: :func:`~fastattn.distill.alignment_loss`, masked to real
  tokens, averaged over the new layers. Only new-mixer parameters train; errors do not propagate
  across layers.
* Stage 2 — end-to-end forward KL(teacher || student) of next-token distributions over text (all
  student parameters train unless ``freeze_attention``).
* Stage 3 — chat distillation: the loss counts only assistant tokens and each assistant turn's
  end-of-turn token (completion-only masking), and the kept attention layers are frozen. "Frozen" means
  the *whole* decoder layer of every ``attention`` layer (input norm, attention, post-attention norm
  and MLP): those layers are the teacher's own blocks and stay bit-identical. Loss ``kl`` (default),
  ``sft`` (cross-entropy on the targets only) or ``kl+ce`` (``(1-w) KL + w CE``).

Losses are token-weighted: a rank computes ``sum of per-token losses / tokens in the global batch``, so
any split of the global batch (gradient accumulation, data-parallel ranks) gives the same gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models import HybridLM
from .data import pad_batch
from .losses import alignment_loss, ce_loss, kd_ce_loss, kl_loss
from .masks import chat_example

STAGES = (1, 2, 3)
LOSSES = ("kl", "sft", "kl+ce")

__all__ = ["STAGES", "LOSSES", "Batch", "StageData", "prepare_data", "batch_indices", "new_mixer_layers",
           "set_trainable", "StageObjective", "student_from_teacher"]


class Batch(NamedTuple):
    """A right-padded batch: ``ids [B, T]``, ``valid [B, T]`` (False on padding) and ``token_mask [B, T]``
    (tokens that count as targets: every real token in stages 1-2, assistant tokens in stage 3)."""
    ids: torch.Tensor
    valid: torch.Tensor
    token_mask: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in self))


class StageData:
    """Examples of one stage, batched on demand; build it with :func:`prepare_data`.

    Either ``blocks`` (an int64 tensor ``[N, T]``, every token real and counted; batches are row
    selections) or ``examples`` (``(ids, token_mask)`` pairs of lists, right-padded with ``pad_id``).
    """

    def __init__(self, examples: Optional[List[Tuple[List[int], List[bool]]]] = None, pad_id: int = 0,
                 blocks: Optional[torch.Tensor] = None):
        if (examples is None) == (blocks is None):
            raise ValueError("StageData needs exactly one of examples or blocks")
        n = len(examples) if examples is not None else blocks.shape[0]
        if n == 0:
            raise ValueError("data must hold at least one example, got 0")
        self.examples, self.blocks = examples, blocks
        self.pad_id = int(pad_id)

    def __len__(self) -> int:
        return len(self.examples) if self.examples is not None else self.blocks.shape[0]

    def batch(self, indices: Sequence[int]) -> Batch:
        if self.blocks is not None:
            ids = self.blocks[torch.as_tensor(list(indices), dtype=torch.long)]
            ones = torch.ones(ids.shape, dtype=torch.bool)
            return Batch(ids, ones, ones.clone())
        seqs = [self.examples[i][0] for i in indices]
        masks = [self.examples[i][1] for i in indices]
        ids, valid, tmask = pad_batch(seqs, self.pad_id, masks=masks)
        return Batch(ids, valid, tmask & valid)


def _check_stage(stage) -> int:
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return stage


def prepare_data(stage: int, data, seq_len: int, vocab_size: int, tokenizer=None) -> StageData:
    """Turn a stage's data into :class:`StageData` (sequences cut to ``seq_len`` tokens).

    Args:
        stage: 1, 2 or 3.
        data: stages 1-2: an int ``LongTensor [N, T]`` of token blocks (e.g. from
            :func:`~fastattn.distill.pack_blocks`), or a list of conversations (each a list of
            ``{"role", "content"}`` dicts; every real token counts). Stage 3: a list of conversations
            (rendered with ``tokenizer.render_chat``; only assistant tokens count). Conversations with no
            assistant token left after truncation are dropped in stage 3. A :class:`StageData` passes through.
        seq_len: maximum tokens per sequence (longer ones are right-truncated).
        vocab_size: the model's vocabulary size; every token id must be below it.
        tokenizer: needed for conversations (a :class:`~fastattn.distill.Tokenizer`).
    Returns:
        :class:`StageData`.

    Example:
        >>> d = prepare_data(2, torch.tensor([[1, 2, 3], [4, 5, 6]]), seq_len=2, vocab_size=8)
        >>> d.batch([1]).ids.tolist()
        [[4, 5]]
    """
    _check_stage(stage)
    if isinstance(data, StageData):
        return data
    if isinstance(data, torch.Tensor):
        if stage == 3:
            raise TypeError("data for stage 3 must be a list of conversations (lists of {'role', 'content'} "
                            "dicts), got a tensor")
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32) or data.shape[0] == 0:
            raise ValueError(f"data must be a non-empty int64 tensor [N, T] of token blocks, got dtype {data.dtype} "
                             f"shape {tuple(data.shape)}")
        if data.shape[1] < 2:
            raise ValueError(f"data blocks must hold at least 2 tokens, got T={data.shape[1]}")
        if int(data.min()) < 0 or int(data.max()) >= vocab_size:
            raise ValueError(f"data token ids must lie in [0, vocab_size={vocab_size}), got range "
                             f"[{int(data.min())}, {int(data.max())}]")
        return StageData(blocks=data[:, :seq_len].long().contiguous())
    if not isinstance(data, (list, tuple)):
        raise TypeError(f"data must be a LongTensor [N, T] (stages 1-2) or a list of conversations, "
                        f"got {type(data).__name__}")
    if tokenizer is None:
        raise ValueError("tokenizer must be given when data is a list of conversations, got None")
    examples = []
    for n, messages in enumerate(data):
        ids, mask = chat_example(tokenizer, messages)
        ids, mask = ids[:seq_len], mask[:seq_len]
        if len(ids) < 2:
            raise ValueError(f"data[{n}] renders to {len(ids)} token(s); at least 2 are needed")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"data[{n}] holds token id {bad[0]} outside the model's vocabulary [0, {vocab_size}) "
                             "(tokenizer and model do not match)")
        if stage == 3:
            if not any(mask[1:]):
                continue
            examples.append((ids, mask))
        else:
            examples.append((ids, [True] * len(ids)))
    if not examples:
        raise ValueError(f"data holds no conversation with an assistant token within seq_len={seq_len}")
    return StageData(examples, pad_id=tokenizer.pad_id)


def _mix_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2 ** 63)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> List[int]:
    """Example indices of the global batch of optimizer step ``step`` (0-based).

    The data is read in epochs; each epoch is a permutation of ``range(n)`` drawn from ``(seed, epoch)``,
    and step ``s`` takes positions ``s*batch_size ... (s+1)*batch_size - 1`` of that endless stream. The
    result depends only on ``(n, batch_size, seed, step)``, so a resumed or data-parallel run reads the
    same batches as an uninterrupted single-process one.

    Example:
        >>> sorted(batch_indices(4, 4, seed=0, step=0))
        [0, 1, 2, 3]
        >>> batch_indices(10, 3, seed=1, step=5) == batch_indices(10, 3, seed=1, step=5)
        True
    """
    if n < 1 or batch_size < 1 or step < 0:
        raise ValueError(f"n, batch_size must be >= 1 and step >= 0, got n={n}, batch_size={batch_size}, step={step}")
    out: List[int] = []
    perms: Dict[int, torch.Tensor] = {}
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(g, n)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(_mix_seed(seed, epoch))
            perms[epoch] = torch.randperm(n, generator=gen)
        out.append(int(perms[epoch][pos]))
    return out


def new_mixer_layers(teacher: HybridLM, student: HybridLM) -> List[int]:
    """Indices of the student layers whose mixer type differs from the teacher's (stage 1 trains them).

    Example:
        >>> from fastattn.models import HybridConfig
        >>> shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        ...              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
        >>> t = HybridLM(HybridConfig.from_preset("attention", **shape))
        >>> new_mixer_layers(t, HybridLM(HybridConfig.from_preset("hybrid-kda", **shape)))
        [1, 2, 3]
    """
    pairs = zip(teacher.layers, student.layers, strict=True)
    return [i for i, (a, b) in enumerate(pairs) if a.mixer_type != b.mixer_type]


def set_trainable(stage: int, teacher: HybridLM, student: HybridLM, freeze_attention: bool) -> Dict[str, list]:
    """Set ``requires_grad`` of the student's parameters for ``stage``; return what trains and what is frozen.

    Stage 1: only the mixers of :func:`new_mixer_layers`. Stages 2-3: everything, except the whole decoder
    layers whose mixer is ``attention`` when ``freeze_attention``.

    Returns:
        ``{"trained_layers": [...], "frozen_layers": [...], "trainable": [names]}``.
    """
    _check_stage(stage)
    types = [layer.mixer_type for layer in student.layers]
    if stage == 1:
        layers = new_mixer_layers(teacher, student)
        if not layers:
            raise ValueError("stage 1 needs at least one student layer whose mixer differs from the teacher's, "
                             f"got student layer_types {tuple(types)} like the teacher's")
        prefixes = tuple(f"layers.{i}.mixer." for i in layers)
        for name, p in student.named_parameters():
            p.requires_grad_(name.startswith(prefixes))
        frozen = [i for i in range(len(types)) if i not in layers]
    else:
        frozen = [i for i, t in enumerate(types) if t == "attention"] if freeze_attention else []
        prefixes = tuple(f"layers.{i}." for i in frozen)
        for name, p in student.named_parameters():
            p.requires_grad_(not (prefixes and name.startswith(prefixes)))
        layers = [i for i in range(len(types)) if i not in frozen]
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    return {"trained_layers": layers, "frozen_layers": frozen, "trainable": names}


class _StopForward(Exception):
    pass


class StageObjective(nn.Module):
    """The loss of one stage as a module (so DDP can wrap it): ``forward(batch, total) -> (loss, stats)``.

    The student is a registered submodule; the teacher is held outside the module tree (it is frozen and
    never synced or saved with the student). ``loss`` is the sum of this batch's per-token losses divided
    by ``total``, the number of loss tokens in the whole global batch; ``stats`` holds detached sums.

    Args:
        stage: 1, 2 or 3.
        teacher, student: HybridLMs of the same shape.
        layers: stage 1's new-mixer layer indices.
        loss: ``kl`` | ``sft`` | ``kl+ce`` (stages 2-3).
        temperature, ce_weight: KL temperature and the CE weight of ``kl+ce``.
    """

    def __init__(self, stage: int, teacher: HybridLM, student: HybridLM, layers: Sequence[int] = (),
                 loss: str = "kl", temperature: float = 1.0, ce_weight: float = 0.5):
        super().__init__()
        self.stage = _check_stage(stage)
        self.student = student
        object.__setattr__(self, "_teacher", teacher)
        self.layers = list(layers)
        self.loss_kind = loss
        self.temperature = temperature
        self.ce_weight = {"kl": 0.0, "sft": 1.0, "kl+ce": ce_weight}[loss]

    @property
    def teacher(self) -> HybridLM:
        return self._teacher

    @staticmethod
    def loss_tokens(stage: int, batch: Batch) -> torch.Tensor:
        """Number of positions the loss counts: real tokens (stage 1), next-token targets (stages 2-3)."""
        if stage == 1:
            return batch.valid.sum()
        return (batch.token_mask[:, 1:] & batch.valid[:, 1:]).sum()

    def _teacher_mixer_io(self, ids: torch.Tensor) -> Dict[int, tuple]:
        """One teacher forward with hooks: ``{layer: (mixer input, step info, mixer output)}``."""
        captured: Dict[int, tuple] = {}
        last = max(self.layers)

        def hook_for(i):
            def hook(module, args, output):
                captured[i] = (args[0].detach(), args[1], output.detach())
                if i == last:
                    raise _StopForward()
            return hook

        handles = [self.teacher.layers[i].mixer.register_forward_hook(hook_for(i)) for i in self.layers]
        try:
            with torch.no_grad():
                self.teacher(ids, logits_to_keep=1)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    def forward(self, batch: Batch, total: torch.Tensor, layer_stats: bool = False):
        if self.stage == 1:
            return self._align(batch, total, layer_stats)
        return self._distill(batch, total)

    def _align(self, batch: Batch, total: torch.Tensor, layer_stats: bool):
        captured = self._teacher_mixer_io(batch.ids)
        mask = batch.valid
        count = mask.sum().to(torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=batch.ids.device)
        stats: Dict[str, torch.Tensor] = {}
        dtype = self.student.dtype
        for i in self.layers:
            x, info, t_out = captured[i]
            info = dataclasses.replace(info, cos=info.cos.to(dtype), sin=info.sin.to(dtype))
            s_out = self.student.layers[i].mixer(x.to(dtype), info)
            mse = alignment_loss(s_out, t_out, mask=mask)
            loss = loss + mse * count
            if layer_stats:
                w = mask[..., None].to(torch.float32)
                stats[f"sq_err.{i}"] = ((s_out.detach().float() - t_out.float()).pow(2) * w).sum() / x.shape[-1]
                stats[f"sq_ref.{i}"] = (t_out.float().pow(2) * w).sum() / x.shape[-1]
        loss = loss / len(self.layers)
        stats["loss_sum"] = loss.detach()
        return loss / total.clamp_min(1), stats

    def _distill(self, batch: Batch, total: torch.Tensor):
        ids = batch.ids
        targets = ids[:, 1:]
        mask = batch.token_mask[:, 1:] & batch.valid[:, 1:]
        count = mask.sum().to(torch.float32)
        s_logits = self.student(ids)[:, :-1]
        if self.ce_weight == 1.0:
            per = ce_loss(s_logits, targets, mask)
        else:
            with torch.no_grad():
                t_logits = self.teacher(ids)[:, :-1]
            if self.ce_weight == 0.0:
                per = kl_loss(s_logits, t_logits, mask, self.temperature)
            else:
                per = kd_ce_loss(s_logits, t_logits, targets, mask, self.temperature, self.ce_weight).total
        loss_sum = per * count
        return loss_sum / total.clamp_min(1), {"loss_sum": loss_sum.detach()}


def student_from_teacher(teacher: HybridLM, preset: str = "hybrid-kda", **overrides) -> HybridLM:
    """A student of ``preset`` built from an in-memory teacher HybridLM (the in-memory twin of
    :func:`fastattn.models.convert_qwen3`).

    Every student tensor whose name and shape exist in the teacher is copied (embeddings, norms, MLPs,
    q/k/v/o of every mixer, q/k norms of attention/EVA layers); the rest (KDA gates, conv, EVA mu/phi)
    keeps its fresh initialisation.

    Args:
        teacher: the teacher model (any layer types).
        preset: ``attention`` | ``hybrid-kda`` | ``eva`` | ``hybrid-kda-eva``.
        overrides: other HybridConfig fields (e.g. ``kda_chunk_size=16``, ``layer_types=[...]``).
    Returns:
        the student, fp32, on the teacher's device.

    Example:
        >>> from fastattn.models import HybridConfig
        >>> t = HybridLM(HybridConfig.from_preset("attention", vocab_size=64, hidden_size=32,
        ...              intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        ...              num_key_value_heads=1, head_dim=16))
        >>> s = student_from_teacher(t, "hybrid-kda")
        >>> torch.equal(s.layers[1].mixer.q_proj.weight, t.layers[1].mixer.q_proj.weight)
        True
    """
    if not isinstance(teacher, HybridLM):
        raise TypeError(f"teacher must be a fastattn.models.HybridLM, got {type(teacher).__name__}")
    if "layer_types" in overrides:
        config = teacher.config.replace(**overrides)
    else:
        config = teacher.config.with_preset(preset)
        if overrides:
            config = config.replace(**overrides)
    student = HybridLM(config).to(teacher.device)
    src = teacher.state_dict()
    with torch.no_grad():
        for name, t in student.state_dict().items():
            if name in src and tuple(src[name].shape) == tuple(t.shape):
                t.copy_(src[name].to(t.dtype))
    return student
