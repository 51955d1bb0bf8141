"""PTM pools: their specs, their resolution (:func:`resolve_pool`, through a repository whose
:meth:`PTMRepository.get` reuses what the store holds intact and trains what is missing), the
pretraining, and the guide that turns a pool into the CLoM/CCLoM loss of one distillation step.

A PTM is identified by how it was made: (arch, seed, source dataset/domain, optimiser settings,
length of the run). That spec hashes to a run id; the checkpoint of epoch e of that run is the store
key ``<arch>-s<seed>-<run id>-e<epoch>``. One pretraining run saves every requested epoch on the
way, so sub-optimal (early-epoch) PTMs cost nothing beyond the longest run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import losses
from .compiled import CompiledCall
from .cost import Meter, Seconds, device_sync
from .config import (Config, ConfigError, DatasetConfig, PretrainConfig, mtt_reach, source_dataset, to_dict,
                     uses_ptms, weight_for)
from .data import ImageData, load_data
from .models import embed_chunked
from .sources import canonical_name
from .store import Checkpoint, CheckpointRepository, CheckpointStore, load_checked
from .train import accuracy, autocast, new_model, train_classifier

log = logging.getLogger(__name__)

# The per-class subset a PTM trains on (``train_per_class``) is drawn with this fixed seed, so the
# data are part of the spec, not of the run that happened to train it first.
PTM_DATA_SEED = 0

# Dataset fields that say where data lives, not what it is: left out of a PTM's identity.
_LOCATION_FIELDS = ("root", "download", "cache_dir")
# Fields added after stores existed, left out of the identity at their default so that the
# checkpoints stored before them keep their keys: the source's and the pretraining recipe's.
_LATER_DEFAULTS = {"val_per_class": 0, "zca": False}
_LATER_PRETRAIN_DEFAULTS = {"dsa_strategy": "none", "schedule": "thirds"}


def _without(fields: dict[str, Any], dropped: tuple[str, ...], later: dict[str, Any]) -> dict[str, Any]:
    """``fields`` less the ``dropped`` ones and those of ``later`` still at their default."""
    return {k: v for k, v in fields.items() if k not in dropped and not (k in later and v == later[k])}


@dataclass(frozen=True)
class PTMSpec:
    arch: str
    seed: int
    source: DatasetConfig
    pretrain: PretrainConfig
    precision: str = "bf16"  # autocast while training (Config.precision, train.autocast)

    def identity(self) -> dict[str, Any]:
        src = _without(to_dict(self.source), _LOCATION_FIELDS, _LATER_DEFAULTS)
        src["name"] = canonical_name(src["name"])
        train = _without(to_dict(self.pretrain), ("save_epochs",), _LATER_PRETRAIN_DEFAULTS)
        ident = {"arch": self.arch, "seed": self.seed, "source": src, "pretrain": train}
        return ident if self.precision == "bf16" else {**ident, "precision": self.precision}

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def key(self, epoch: int) -> str:
        return f"{self.arch}-s{self.seed}-{self.run_id}-e{epoch:04d}"


def pool_specs(cfg: Config) -> list[PTMSpec]:
    src = source_dataset(cfg)
    return [PTMSpec(a, s, src, cfg.pretrain, cfg.precision) for a in cfg.pool.archs for s in cfg.pool.seeds]


def save_epochs(cfg: Config) -> list[int]:
    """Epochs checkpointed by a pretraining run: the pool's epoch and ``pretrain.save_epochs``, and
    for MTT every epoch of its expert trajectories, whichever of the run's users trains it first (a
    guiding pool or the experts), so that it is trained once."""
    trajectory = range(mtt_reach(cfg.distill) + 1) if cfg.distill.method == "mtt" else ()
    return sorted({cfg.pool.epoch, *cfg.pretrain.save_epochs, *trajectory})


@dataclass
class Pool:
    """A resolved pool: its PTMs, how many of them were trained and reused to resolve it, and what
    the trainings run here cost (seconds, bytes written to the store)."""

    ptms: list[PTM]
    trainings: int
    hits: int
    trained: Seconds = Seconds()
    bytes_written: int = 0

    def manifest(self) -> list[dict[str, Any]]:
        return [{"id": p.key, "arch": p.arch, "seed": p.seed, "epoch": p.epoch,
                 "test_accuracy": p.test_accuracy, "train_accuracy": p.train_accuracy,
                 "train_cost": None if p.train_cost is None else p.train_cost.as_dict()} for p in self.ptms]

    def costs(self) -> dict[str, Seconds | None]:
        """Each PTM run's training cost up to the furthest epoch this pool holds of it, by that
        PTM's key (None: stored before costs were recorded). A run serving twice (MTT's expert
        trajectory and a guiding PTM of an earlier epoch) is paid once."""
        furthest: dict[str, PTM] = {}
        for p in self.ptms:
            run = p.key.rsplit("-e", 1)[0]
            if run not in furthest or p.epoch > furthest[run].epoch:
                furthest[run] = p
        return {p.key: p.train_cost for p in furthest.values()}

    def joined(self, other: Pool) -> Pool:
        """Both pools' PTMs and what resolving both took (MTT: the guiding pool and the experts)."""
        return Pool(self.ptms + other.ptms, self.trainings + other.trainings, self.hits + other.hits,
                    self.trained + other.trained, self.bytes_written + other.bytes_written)


def resolve_pool(cfg: Config, target: ImageData, device: torch.device, progress: bool = True,
                 repo: CheckpointRepository | None = None, idle: bool = False) -> Pool:
    """Load the pool's PTMs through ``repo`` (default: a :class:`PTMRepository` on ``cfg.store``),
    training the missing ones on ``pool.source``, and check that they fit ``target``. A pool
    whose weights are all zero is idle and is not resolved (the plain method) unless ``idle``."""
    if not cfg.pool.archs or not (idle or uses_ptms(cfg)):
        return Pool([], 0, 0)
    repo = repo or PTMRepository(CheckpointStore(cfg.store), progress)
    load_source = source_loader(cfg, target, device)
    needs_labels = any(weight_for(cfg.loss.clom, a) > 0 for a in cfg.pool.archs)
    before = repo_counts(repo)
    ptms = []
    for ckpt in fetch_runs(repo, pool_specs(cfg), cfg.pool.epoch, save_epochs(cfg), load_source):
        check_compatible(tuple(ckpt.meta["shape"]), ckpt.meta["classes"], target, needs_labels)
        ptms.append(load_ptm(ckpt, device))
    return pool_since(ptms, repo, before)


def fetch_runs(repo: CheckpointRepository, specs: list[PTMSpec], epoch: int, epochs_to_save: list[int],
               load_source: Callable[[], ImageData]) -> list[Checkpoint]:
    """The checkpoint at ``epoch`` of every spec's run, in spec order. Runs stored or free are served
    first, and a run that another process is training is waited for only after them: two trials
    that need the same missing pool train its PTMs side by side, on their own cores, instead of
    one training all while the other waits."""
    got = [repo.get(spec, epoch, epochs_to_save, load_source, wait=False) for spec in specs]
    return [ckpt or repo.get(spec, epoch, epochs_to_save, load_source) for spec, ckpt in zip(specs, got)]


def repo_counts(repo: CheckpointRepository) -> tuple[int, int, Seconds, int]:
    """What ``repo`` has served so far: trainings, hits, training seconds, bytes written."""
    return repo.trainings, repo.hits, repo.trained, repo.bytes_written


def pool_since(ptms: list[PTM], repo: CheckpointRepository, before: tuple[int, int, Seconds, int]) -> Pool:
    """A :class:`Pool` of ``ptms`` with what ``repo`` served since :func:`repo_counts` gave ``before``."""
    trainings, hits, trained, written = before
    return Pool(ptms, repo.trainings - trainings, repo.hits - hits, repo.trained - trained,
                repo.bytes_written - written)


def source_loader(cfg: Config, target: ImageData, device: torch.device) -> Callable[[], ImageData]:
    """The data the pool's PTMs train on, loaded on the first call (only a training needs them).
    A PTM's training data is a function of its spec alone (never of this run's seed), so a stored
    checkpoint means the same model whichever run trained it: ``target`` serves only when it is
    that same data."""
    src_cfg = source_dataset(cfg)
    cache: dict[str, ImageData] = {}

    def load_source() -> ImageData:
        if "src" not in cache:
            same = src_cfg == cfg.dataset and (cfg.seed == PTM_DATA_SEED or not src_cfg.train_per_class)
            cache["src"] = target if same else load_data(src_cfg, PTM_DATA_SEED).to(device)
        return cache["src"]

    return load_source


class PTMRepository:
    """Resolves PTM specs to checkpoints: reuse what the store has, train what is missing (every
    requested epoch of a run in one go). Single flight comes from the store's lock on the run (a
    flock locally, a lease object on S3), so it holds across processes, nodes and clusters: the
    first caller trains, with its own device and resources, and the others wait, then load.
    The :class:`~ptmdd_ray.store.CheckpointRepository` of a local (or object) store; the Ray
    service's :class:`~ptmdd_ray.service.RayRepository` serves stored checkpoints through its
    actor instead (:meth:`stored`)."""

    def __init__(self, store: CheckpointStore, progress: bool = True):
        self.store = store
        self.progress = progress
        self.trainings = 0
        self.hits = 0
        self.trained = Seconds()  # what the trainings run here cost
        self.bytes_written = 0

    def stored(self, key: str) -> Checkpoint | None:
        """The intact stored checkpoint ``key`` (counted as a hit), or None. The Ray service
        overrides this to serve through its store actor."""
        ckpt = load_checked(self.store, key)
        if ckpt is not None:
            self.store.count(hits=1)
        return ckpt

    def get(self, spec: PTMSpec, epoch: int, epochs_to_save: list[int],
            load_source: Callable[[], ImageData], wait: bool = True) -> Checkpoint | None:
        """The checkpoint of ``spec`` at ``epoch`` (:class:`~ptmdd_ray.store.CheckpointRepository`):
        the stored one if intact (:meth:`stored`; a damaged one is quarantined), else the run is
        trained here and saved (:func:`train_run`), or, if another process trained it while this
        one waited for the run's lock, loaded as a hit. With ``wait=False``, None at once when
        another process holds the run's lock (it is training the run)."""
        key = spec.key(epoch)
        while True:
            ckpt = self.stored(key)
            if ckpt is not None:
                self.hits += 1
                return ckpt
            run = train_run(self.store, spec, sorted({*epochs_to_save, epoch}), load_source, self.progress, wait)
            if run is None:
                return None
            if run:
                self.trainings += 1
                self.trained, self.bytes_written = self.trained + run.seconds, self.bytes_written + run.bytes
                return self.store.load(key)
            # another process trained it while we waited for the run's lock: load it as a hit


@dataclass
class Training:
    """A pretraining run as :func:`train_run` did it: the keys written (none: another process had
    trained them), what it cost, the bytes it wrote. True when it trained."""

    keys: list[str]
    seconds: Seconds = Seconds()
    bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def train_run(store: CheckpointStore, spec: PTMSpec, epochs_to_save: list[int],
              data: ImageData | Callable[[], ImageData], progress: bool = False,
              wait: bool = True) -> Training | None:
    """Pretrain ``spec`` and save every requested epoch the store does not have yet. Under the
    run's store lock, so that processes sharing a local store (two studies, each with its own Ray)
    train a run once: the second finds the epochs written and returns an empty :class:`Training`
    without training (with ``wait=False``, None at once while another holds the lock). ``data``
    may be a callable, called only when training. Each checkpoint's metadata keeps
    ``train_cost``: the seconds of its run up to its epoch (what that PTM costs)."""
    store.check_writable()
    with store.lock(f"train-{spec.run_id}", wait) as held:
        if not held:
            return None
        missing = sorted(e for e in set(epochs_to_save) if not store.has(spec.key(e)))
        if not missing:
            return Training([])
        data = data() if callable(data) else data
        log.info("training PTM %s (epochs %s)", spec.key(max(missing)), missing)
        run = Training([])
        with Meter(device_sync(data.x_train.device)) as meter:
            for e, (state, acc, cost) in pretrain(spec, missing, data, progress).items():
                meta = {"arch": spec.arch, "seed": spec.seed, "epoch": e, "test_accuracy": acc["test"],
                        "train_accuracy": acc["train"], "train_cost": cost.as_dict(),
                        "run_id": spec.run_id, "spec": spec.identity(),
                        "shape": [data.channels, data.num_classes, data.im_size], "classes": data.classes}
                run.bytes += store.save(spec.key(e), state, meta)["bytes"]
                run.keys.append(spec.key(e))
        run.seconds = meter.seconds
        store.count(trainings=1)
        return run


def store_stats(store: CheckpointStore) -> dict[str, Any]:
    """The store's totals (checkpoints, life-time trainings and hits, bytes, training seconds) and
    one row per PTM checkpoint: its bytes and what it cost to train, up to its epoch. A run's
    checkpoints share one training, so the totals count each run once, at its longest checkpoint;
    checkpoints stored before costs were recorded count in ``without_cost``."""
    metas = store.ls()
    rows, longest = [], {}
    for m in metas:
        cost = Seconds.from_dict(m.get("train_cost"))
        rows.append({"key": m["key"], "arch": m.get("arch"), "seed": m.get("seed"), "epoch": m.get("epoch"),
                     "bytes": int(m.get("bytes", 0)), "train_wall_s": None if cost is None else cost.wall,
                     "train_cpu_s": None if cost is None else cost.cpu})
        run = m.get("run_id", m["key"])
        if cost is not None and (run not in longest or cost.wall > longest[run].wall):
            longest[run] = cost
    total = sum(longest.values(), Seconds())
    return {"checkpoints": len(metas), **store.counters(), "bytes": sum(r["bytes"] for r in rows),
            "train_wall_s": total.wall, "train_cpu_s": total.cpu,
            "without_cost": sum(r["train_wall_s"] is None for r in rows), "ptms": rows}


def pretrain(spec: PTMSpec, epochs_to_save: list[int], data: ImageData, progress: bool = True
             ) -> dict[int, tuple[dict[str, torch.Tensor], dict[str, float], Seconds]]:
    """Train one PTM up to the largest requested epoch of its ``spec.pretrain.epochs``-epoch run
    (its recipe: by default lr x0.1 at 1/3 and 2/3 of the run, no augmentation; epoch 0 is the
    initialisation, which MTT's trajectories start from); return
    {epoch: (state_dict, {"test": accuracy, "train": accuracy}, seconds so far)} for the requested
    epochs: the train accuracy says how far a checkpoint fits its data (an over-trained PTM is
    near 1); the seconds, what that checkpoint cost to make."""
    t = spec.pretrain
    shape = (data.channels, data.num_classes, data.im_size)
    model = new_model(spec.arch, shape, seed=spec.seed, device=data.x_train.device)
    gen = torch.Generator().manual_seed(spec.seed)
    wanted = set(epochs_to_save)
    out: dict[int, tuple[dict[str, torch.Tensor], dict[str, float], Seconds]] = {}
    last = max(wanted)
    bar = tqdm(total=last, desc=f"pretrain {spec.arch} s{spec.seed}", disable=not progress, leave=False)
    meter = Meter(device_sync(data.x_train.device))

    forward = compiled_forward(model, spec.precision)

    def on_epoch(e: int, m: nn.Module) -> None:
        bar.update(1 if e else 0)
        if e in wanted:
            acc = {"test": accuracy(m, data.x_test, data.y_test, precision=spec.precision, forward=forward),
                   "train": accuracy(m, data.x_train, data.y_train, precision=spec.precision, forward=forward)}
            out[e] = ({k: v.detach().cpu().clone() for k, v in m.state_dict().items()}, acc, meter.lap())
            bar.set_postfix(epoch=e, test_acc=f"{acc['test']:.3f}", train_acc=f"{acc['train']:.3f}")

    milestones = (t.epochs // 3, 2 * t.epochs // 3) if t.schedule == "thirds" else ()
    with meter:
        on_epoch(0, model)
        train_classifier(model, data.x_train, data.y_train, epochs=last, lr=t.lr, momentum=t.momentum,
                         weight_decay=t.weight_decay, batch=t.batch, milestones=milestones,
                         dsa_strategy=t.dsa_strategy, gen=gen, on_epoch=on_epoch, precision=spec.precision,
                         forward=forward)
    bar.close()
    return out


def compiled_forward(model: nn.Module, precision: str):
    """The compiled forward that trains and scores a PTM under ``precision: bf16-cpu`` (its
    bf16 convolutions pay only in a compiled graph: BENCHMARKS.md, "bf16 on the CPU"; one
    compilation per architecture and batch shape serves every PTM of a run). The other precisions
    train eager, as every PTM stored under them did, so their keys keep their meaning. ``bf16-cpu``
    PTMs stored before this path existed (commits c8de90b to 78f3e58) were trained eager: the
    same recipe in another float order, the difference two machines make too, so their key stands."""
    return CompiledCall(model, "forward") if precision == "bf16-cpu" else None


@dataclass
class PTM:
    """A loaded, frozen pre-trained model and its record."""

    arch: str
    seed: int
    epoch: int
    key: str
    test_accuracy: float
    model: nn.Module
    train_accuracy: float | None = None  # None: stored before train accuracies were recorded
    train_cost: Seconds | None = None  # its run's seconds up to its epoch; None: stored before costs were


def load_ptm(ckpt: Checkpoint, device) -> PTM:
    m = ckpt.meta
    channels, num_classes, im_size = m["shape"]
    model = new_model(m["arch"], (channels, num_classes, im_size), seed=0, device="cpu", channels_last=True)
    model.load_state_dict(ckpt.tensors)
    model = model.to(device).eval().requires_grad_(False)  # frozen once; eval: BN PTMs must not drift
    train = m.get("train_accuracy")
    return PTM(m["arch"], m["seed"], m["epoch"], ckpt.key, float(m["test_accuracy"]), model,
               None if train is None else float(train), Seconds.from_dict(m.get("train_cost")))


def check_compatible(ptm_data_shape: tuple[int, int, int], ptm_classes: list[str], target: ImageData,
                     needs_labels: bool) -> None:
    """PTMs must accept the target's images; CLoM also needs the target's label space."""
    channels, _, im_size = ptm_data_shape
    if (channels, im_size) != (target.channels, target.im_size):
        raise ConfigError(f"pool.source: PTM input {channels}x{im_size}px does not match the target's "
                          f"{target.channels}x{target.im_size}px (set pool.source.im_size)")
    if needs_labels and list(ptm_classes) != list(target.classes):
        raise ConfigError("loss.clom: the pool's label space differs from the target's "
                          "(use loss.cclom for PTMs from another label space)")


class PTMGuide:
    """The paper's PTM supervision for one distillation step.

    Each call draws one PTM (an arch uniformly among those with a non-zero weight, then a seed) and
    returns alpha * CLoM + beta * CCLoM on the synthetic images: by default the DSA-augmented ones
    the matching term sees, or the raw set with ``augmented=False`` (what the reference code did).
    CCLoM compares with a random batch of real target images, embedded without grad. A frozen PTM
    in eval mode embeds a real image the same way at every step (no augmentation on the real
    side), so each PTM embeds the whole real training set once and every step indexes its batch
    from those features: the reference's batch of thousands then costs a gather, not a forward
    pass (exact up to float rounding; up to :data:`FEATURE_CACHE_BYTES`, past which every step
    embeds its batch)."""

    FEATURE_CACHE_BYTES = 2 * 2**30

    def __init__(self, ptms: list[PTM], clom: float | dict[str, float], cclom: float | dict[str, float],
                 real: ImageData, cclom_batch: int, seed: int, augmented: bool = True):
        self.by_arch: dict[str, list[PTM]] = {}
        for p in ptms:
            if weight_for(clom, p.arch) > 0 or weight_for(cclom, p.arch) > 0:
                self.by_arch.setdefault(p.arch, []).append(p)
        self.archs = sorted(self.by_arch)
        self.clom, self.cclom = clom, cclom
        self.real_x, self.real_y = real.x_train, real.y_train
        self.cclom_batch = cclom_batch
        self.augmented = augmented
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self._features: dict[int, torch.Tensor] = {}  # id(PTM model) -> embeddings of real_x
        self._calls: dict[str, tuple] = {}  # arch -> compiled (forward, embed), see compile()
        self._precision = "fp32"  # of the PTMs' passes on the synthetic images, see compile()

    @classmethod
    def from_config(cls, loss, ptms: list[PTM], real: ImageData, seed: int) -> PTMGuide:
        """The guide a config's ``loss`` section describes (weights, CCLoM batch, input)."""
        return cls(ptms, loss.clom, loss.cclom, real, loss.cclom_batch, seed, loss.augmented)

    def __bool__(self) -> bool:
        return bool(self.archs)

    def compile(self, precision: str = "fp32") -> None:
        """Run the PTMs' passes on the synthetic images through ``torch.compile`` (one compilation
        per architecture serves all its PTMs; see :mod:`ptmdd_ray.compiled`), under ``precision``'s
        autocast (:func:`ptmdd_ray.methods.pass_precision`); the losses stay fp32."""
        self._precision = precision
        for arch, ptms in self.by_arch.items():
            self._calls[arch] = (CompiledCall(ptms[0].model, "forward"), CompiledCall(ptms[0].model, "embed"))

    def get_state(self) -> dict[str, Any]:
        """Its random states (which PTM each step draws, CCLoM's real batches), for a checkpoint:
        the generator's as a tensor, Python's as JSON."""
        version, internal, gauss = self.rng.getstate()
        return {"gen": self.gen.get_state(), "rng": [version, list(internal), gauss]}

    def set_state(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def __call__(self, syn_aug: torch.Tensor, syn_raw: torch.Tensor, syn_y: torch.Tensor) -> torch.Tensor:
        syn = syn_aug if self.augmented else syn_raw
        arch = self.rng.choice(self.archs)
        ptm = self.rng.choice(self.by_arch[arch]).model
        alpha, beta = weight_for(self.clom, arch), weight_for(self.cclom, arch)
        loss = syn.new_zeros(())
        forward, embed = self._calls.get(arch, (None, None))
        if alpha > 0:
            with autocast(syn.device, self._precision):
                logits = forward(ptm, syn) if forward else ptm(syn)
            loss = loss + alpha * losses.clom(logits.float(), syn_y)
        if beta > 0:
            idx = torch.randint(self.real_x.shape[0], (self.cclom_batch,), generator=self.gen).to(self.real_x.device)
            with autocast(syn.device, self._precision):
                feats = embed(ptm, syn) if embed else ptm.embed(syn)
            loss = loss + beta * losses.cclom(feats.float(), self.real_features(ptm, idx), syn_y, self.real_y[idx])
        return loss

    @torch.no_grad()
    def real_features(self, ptm: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        """The PTM's embeddings of the real images ``idx``: from the per-PTM cache of the whole
        real set (made on first use) while the caches fit the budget, else embedded now."""
        feats = self._features.get(id(ptm))
        if feats is None:
            dim = embed_chunked(ptm, self.real_x[:1]).shape[1]
            held = sum(f.numel() * f.element_size() for f in self._features.values())
            if held + self.real_x.shape[0] * dim * 4 > self.FEATURE_CACHE_BYTES:
                return embed_chunked(ptm, self.real_x[idx])
            # a PTM is in eval mode (BatchNorm on running statistics): chunks embed independently
            feats = self._features[id(ptm)] = torch.cat([ptm.embed(c) for c in self.real_x.split(1024)])
        return feats[idx]
