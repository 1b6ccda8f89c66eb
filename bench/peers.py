"""The strongest peers of bench/contenders.py (issue #37), each trained and sampled through its own package.

This script runs in the peers' environment (.venv-peers, `make bench-peers`: torch 2.14.1, denoising-diffusion-pytorch
2.3.4, ema-pytorch 0.8.3) and imports nothing of resdiff. bench/contenders.py (resdiff's environment) starts it for
each budget (`python -m bench.peers`, from the repository root) and imports its top part (the exchange format, the NFE
counts), which needs only numpy.

Peers (line numbers are those of denoising_diffusion_pytorch/denoising_diffusion_pytorch.py, elucidated_diffusion.py
and ema_pytorch/ema_pytorch.py as installed):
    lucidrains  GaussianDiffusion(Unet(**UNET), image_size=32, sampling_timesteps=50) with its own defaults
                (lines 479-494): objective 'pred_v' with its loss weight snr / (snr + 1) (line 594, min-SNR off),
                beta_schedule 'sigmoid' (lines 463-476), timesteps 1000, ddim_sampling_eta 0. Sampled by its DDIM
                (GaussianDiffusion.sample -> ddim_sample, lines 702-747, chosen because sampling_timesteps <
                timesteps): one Unet call per step, 50 model evaluations.
    edm         ElucidatedDiffusion(Unet(**UNET, learned_sinusoidal_cond=True), image_size=32, num_sample_steps=25)
                with its own defaults (elucidated_diffusion.py lines 36-53): EDM's preconditioning (c_skip, c_out,
                c_in, c_noise = ln(sigma) / 4, lines 89-99), log-normal noise levels (P_mean -1.2, P_std 1.2,
                lines 244-245), EDM's loss weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 with
                sigma_data 0.5 (lines 241-242); sampled by its Heun sampler (ElucidatedDiffusion.sample, lines
                142-200: sigma_min 0.002, sigma_max 80, rho 7, and its stochastic churn S_churn 80, S_tmin 0.05,
                S_tmax 50, S_noise 1.003), which calls the network twice a step except the last (sigma_next = 0:
                Euler only), so 25 steps are 2 * 25 - 1 = 49 model evaluations (its default 32 steps would be 63).
                The package's EDM rather than k-diffusion's: the same Unet class and training loop as lucidrains,
                so the two peers differ only in the diffusion, and k-diffusion 0.1.1's dependencies (clip, clean-fid,
                kornia, torchsde, wandb, ...) are not needed; its loss is EDM's own weight, not k-diffusion's soft
                min-SNR. ElucidatedDiffusion asserts a Unet with learned (or random) sinusoidal embeddings
                (line 55): its time input is the continuous c_noise, so the Unet gets learned_sinusoidal_cond=True;
                GaussianDiffusion asserts the opposite (line 498), so lucidrains keeps the plain embedding.

The U-Net of both: the package's Unet (lines 276-295) with dim_mults (1, 2, 2) and dim 30, everything else its
defaults (two ResNet blocks a level, linear attention on the outer levels and full attention at the innermost one
and the middle, 4 heads of 32, RMSNorm, no dropout): resdiff's tiny preset's levels and multipliers (32, 16, 8
pixels; attention at 8), width chosen for the parameter count: 1,253,851 (lucidrains) and 1,252,299 (edm)
parameters, +5% of tiny's 1,192,387. Its own dim_mults (1, 2, 4, 8) cannot reach tiny's size within 10%: dim 10
gives 1,020,379 (-14%), dim 12 1,425,603 (+20%), and an odd dim breaks its sinusoidal embedding.

Training, both peers: the package's Trainer (lines 887-1114) cannot run here as it is (its loop runs to a step
count, not a clock; its FID needs Inception weights from the network; it does not accept an ElucidatedDiffusion,
whose class has no is_ddim_sampling, line 927), so its step is repeated with its own defaults, read from
Trainer.__init__'s signature at run time (lines 888-913, the installed values): Adam(train_lr 1e-4, adam_betas
(0.9, 0.99)) (line 962), ema_pytorch.EMA(beta=ema_decay 0.995, update_every=ema_update_every 10) (line 967) with
EMA's own defaults (ema_pytorch.py lines 76-97: update_after_step 100, inv_gamma 1, power 2/3: the decay warms up),
train_batch_size 16, gradient_accumulate_every 1, max_grad_norm 1.0, augment_horizontal_flip True, fp32 (amp
False). One step as Trainer.train (lines 1056-1084): loss = diffusion(batch in [0, 1]), backward, clip, Adam
step, zero_grad, EMA update. Batches as its DataLoader gives them (line 955: shuffle=True, no drop_last: shuffled
epochs, the last batch of one smaller), each image flipped left-right with probability 1/2 (RandomHorizontalFlip,
line 872).

Images (in and out): a uint8 .npy of shape (N, 3, H, W), read and written by read_images/write_images; training
reads the parent's (composited on white as resdiff prepares them), sampling writes the EMA model's samples.
Resumable: the checkpoint (RUN_DIR/checkpoint.pt) holds the weights, EMA, optimizer, random states, the data
position and the clock (training seconds, steps, images), written at the end of each `train`.

    python -m bench.peers train lucidrains --images OUT/images.npy --run-dir OUT/runs/lucidrains --seconds 300
    python -m bench.peers sample lucidrains --run-dir OUT/runs/lucidrains --n 1000 --seed 0 --out samples.npy

Each command ends with bench.runner's result line `RESULT {json}`: peer, steps, images, train_s, parameters, nfe,
sampler, the recipe (the values above, as the installed package has them), device and versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.runner import result_line, wait_while_held

PEERS = ("lucidrains", "edm")
# The package's Unet at resdiff's tiny size (see the docstring); edm adds the embedding ElucidatedDiffusion needs.
UNET = dict(dim=30, dim_mults=(1, 2, 2))
DDIM_STEPS = 50  # lucidrains: GaussianDiffusion(sampling_timesteps=...): its DDIM at 50 model evaluations
HEUN_STEPS = 25  # edm: ElucidatedDiffusion(num_sample_steps=...): its Heun sampler at 2 * 25 - 1 = 49
IMAGE_SIZE = 32
CHECKPOINT = "checkpoint.pt"
# Trainer.__init__'s arguments whose defaults make the training recipe (read from the installed package).
TRAINER_KEYS = ("train_batch_size", "gradient_accumulate_every", "augment_horizontal_flip", "train_lr", "adam_betas",
                "ema_decay", "ema_update_every", "max_grad_norm", "amp")


# ------------------------------------------------------- what bench/contenders.py shares (numpy only)


def write_images(path: Path, images: np.ndarray) -> Path:
    """``images`` (uint8 (N, 3, H, W)) as a .npy at ``path``, written whole (a temporary name, then renamed)."""
    check_images(images, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(images), allow_pickle=False)
    tmp.replace(path)
    return path


def read_images(path: Path) -> np.ndarray:
    """The uint8 (N, 3, H, W) images of a .npy written by write_images; one line naming the file otherwise."""
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read {path} as a .npy of images ({err}); write it again") from None
    check_images(images, path)
    return images


def check_images(images: np.ndarray, path: Path) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or not len(images):
        raise SystemExit(f"error: {path}: expected uint8 images of shape (N, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")


def ddim_nfe(sampling_timesteps: int, timesteps: int = 1000) -> int:
    """Model evaluations of one GaussianDiffusion.sample: its DDIM loop (used when sampling_timesteps < timesteps)
    calls the model once for each of its sampling_timesteps pairs of times; otherwise its ancestral loop, once for
    each of the timesteps."""
    return sampling_timesteps if sampling_timesteps < timesteps else timesteps


def heun_nfe(num_sample_steps: int) -> int:
    """Model evaluations of one ElucidatedDiffusion.sample: each of its steps calls the network once, then once
    more for the second-order correction unless the next sigma is 0 (only the last step's is)."""
    return 2 * num_sample_steps - 1


def nfe(peer: str) -> int:
    """Model evaluations per sample of ``peer``'s sampler as this script configures it."""
    return {"lucidrains": ddim_nfe(DDIM_STEPS), "edm": heun_nfe(HEUN_STEPS)}[peer]


def sampler_name(peer: str) -> str:
    return {"lucidrains": f"lucidrains DDIM, {DDIM_STEPS} steps",
            "edm": f"EDM Heun (stochastic), {HEUN_STEPS} steps"}[peer]


def save_whole(state: dict, file: Path) -> None:
    """A checkpoint of tensors, numbers and lists (weights_only loads it) written whole: a temporary name, then renamed."""
    import torch

    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, file.with_suffix(".tmp"))
    file.with_suffix(".tmp").replace(file)


@dataclass
class Progress:
    """Where a peer's training stands: its clock (training seconds only), optimizer steps and images."""

    seconds: float = 0.0
    steps: int = 0
    images: int = 0


# -------------------------------------------------------------------- the peers (need their package)


def trainer_defaults() -> dict:
    """The defaults of the package's Trainer that make the training recipe, read from its installed signature."""
    import inspect

    from denoising_diffusion_pytorch import Trainer

    params = inspect.signature(Trainer.__init__).parameters
    return {key: params[key].default for key in TRAINER_KEYS}


def build(peer: str):
    """(the diffusion module, with its Unet inside; the Unet; the recipe as the built objects hold it)."""
    from denoising_diffusion_pytorch import ElucidatedDiffusion, GaussianDiffusion, Unet

    if peer == "lucidrains":
        unet = Unet(**UNET)
        diffusion = GaussianDiffusion(unet, image_size=IMAGE_SIZE, sampling_timesteps=DDIM_STEPS)
        recipe = {"class": "GaussianDiffusion", "objective": diffusion.objective, "timesteps": diffusion.num_timesteps,
                  "beta_schedule": "sigmoid (its default)", "sampling_timesteps": diffusion.sampling_timesteps,
                  "ddim_sampling_eta": diffusion.ddim_sampling_eta, "ddim": diffusion.is_ddim_sampling}
    elif peer == "edm":
        unet = Unet(**UNET, learned_sinusoidal_cond=True)
        diffusion = ElucidatedDiffusion(unet, image_size=IMAGE_SIZE, num_sample_steps=HEUN_STEPS)
        recipe = {"class": "ElucidatedDiffusion", **{k: getattr(diffusion, k) for k in (
            "sigma_min", "sigma_max", "sigma_data", "rho", "P_mean", "P_std", "S_churn", "S_tmin", "S_tmax", "S_noise",
            "num_sample_steps")}}
    else:
        raise SystemExit(f"error: unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    recipe["unet"] = {**UNET, "learned_sinusoidal_cond": unet.random_or_learned_sinusoidal_cond}
    return diffusion, unet, recipe


class PeerRun:
    """One peer's training state in RUN_DIR: its diffusion module, Adam, EMA, data order and clock, as the
    package's Trainer would build them (its defaults), checkpointed whole."""

    def __init__(self, peer: str, run_dir: Path, device: str, seed: int = 0):
        import torch
        from ema_pytorch import EMA

        self.peer, self.file, self.device = peer, run_dir / CHECKPOINT, torch.device(device)
        torch.manual_seed(seed)
        self.diffusion, self.unet, recipe = build(peer)
        self.diffusion.to(self.device)
        t = self.trainer = trainer_defaults()
        if t["gradient_accumulate_every"] != 1 or t["amp"]:
            raise SystemExit(f"error: this denoising-diffusion-pytorch's Trainer accumulates or casts by default "
                             f"({t}); bench/peers.py repeats only a plain fp32 step")
        self.optimizer = torch.optim.Adam(self.diffusion.parameters(), lr=t["train_lr"], betas=t["adam_betas"])
        self.ema = EMA(self.diffusion, beta=t["ema_decay"], update_every=t["ema_update_every"]).to(self.device)
        self.recipe = {**recipe, "trainer": {k: list(v) if isinstance(v, tuple) else v for k, v in t.items()},
                       "ema": {k: getattr(self.ema, k) for k in ("beta", "update_every", "update_after_step",
                                                                   "inv_gamma", "power", "min_value")},
                       "optimizer": "Adam"}
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.images: torch.Tensor | None = None
        self.order, self.position = None, 0

    def parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def load_images(self, path: Path) -> None:
        import torch

        self.images = torch.from_numpy(read_images(path))
        if self.images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise SystemExit(f"error: {path}: the peers train on (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) images, "
                             f"not {tuple(self.images.shape)}")

    def _batch(self):
        """The next batch of the shuffled epoch in [0, 1] (an epoch's last may be smaller), flipped at random."""
        import torch

        if self.order is None or self.position >= len(self.order):
            self.order, self.position = torch.randperm(len(self.images), generator=self.generator), 0
        idx = self.order[self.position:self.position + self.trainer["train_batch_size"]]
        self.position += len(idx)
        x = self.images[idx].clone()
        if self.trainer["augment_horizontal_flip"]:
            flip = torch.rand(len(x), generator=self.generator) < 0.5
            x[flip] = x[flip].flip(-1)
        return x.to(self.device).float() / 255  # ToTensor's [0, 1]; the diffusion normalises to [-1, 1] itself

    def step(self) -> tuple[int, float]:
        """One step of Trainer.train: loss, backward, clip, Adam, zero_grad, EMA update. (images, loss)."""
        import torch

        self.diffusion.train()
        x = self._batch()
        loss = self.diffusion(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.diffusion.parameters(), self.trainer["max_grad_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.update()
        return len(x), loss.item()

    def save(self, progress: Progress) -> None:
        """Everything a restart needs in one file."""
        import torch

        state = {"peer": self.peer, "recipe": json.dumps(self.recipe, sort_keys=True),
                 "model": self.diffusion.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "order": self.order, "position": self.position,
                 "generator": self.generator.get_state(), "rng": torch.get_rng_state(), "progress": asdict(progress)}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        save_whole(state, self.file)

    def restore(self) -> Progress:
        """The state of the checkpoint, if there is one; refuses one of another peer or recipe."""
        import torch

        if not self.file.is_file():
            return Progress()
        state = torch.load(self.file, map_location=self.device, weights_only=True)
        if state["peer"] != self.peer or state["recipe"] != json.dumps(self.recipe, sort_keys=True):
            raise SystemExit(f"error: {self.file} is a checkpoint of {state['peer']} with another recipe; "
                             f"remove it, or train into another run directory")
        self.diffusion.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.order, self.position = state["order"], state["position"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        return Progress(**state["progress"])

    def sample(self, n: int, seed: int, batch_size: int) -> np.ndarray:
        """n uint8 samples of the EMA weights with the peer's sampler, seeded; the model evaluations are counted
        (a hook on the EMA copy's Unet) and must be nfe(peer) per image."""
        import torch

        model = self.ema.ema_model.eval()
        unet = model.model if self.peer == "lucidrains" else model.net
        calls = []
        hook = unet.register_forward_hook(lambda module, args, out: calls.append(len(out)))
        torch.manual_seed(seed)
        batches = []
        try:
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    size = min(batch_size, n - start)
                    before = len(calls)
                    batches.append(model.sample(batch_size=size))  # [0, 1]
                    if len(calls) - before != nfe(self.peer) or set(calls[before:]) != {size}:
                        raise SystemExit(f"error: {self.peer} called its network {len(calls) - before} times for one "
                                         f"batch, not nfe()={nfe(self.peer)}: the package's sampler changed")
        finally:
            hook.remove()
        images = torch.cat(batches).mul(255).clamp(0, 255).round().to(torch.uint8)
        return images.cpu().numpy()


# ---------------------------------------------------------------------------------------- commands


def describe(run: PeerRun, progress: Progress, command: str) -> dict:
    from importlib.metadata import version

    return {"peer": run.peer, "command": command, "train_s": progress.seconds, "steps": progress.steps,
            "images": progress.images, "parameters": run.parameters(), "nfe": nfe(run.peer),
            "sampler": sampler_name(run.peer), "recipe": run.recipe, "device": str(run.device),
            "versions": {name: version(name) for name in ("torch", "denoising-diffusion-pytorch", "ema-pytorch")}}


def train(run: PeerRun, images: Path, seconds: float) -> Progress:
    """Step until the training clock (the steps only) reaches ``seconds``, then checkpoint."""
    progress = run.restore()
    if progress.seconds >= seconds:
        print(f"{run.peer}: its clock is at {progress.seconds:.0f} s, past {seconds:.0f} s: nothing to train",
              flush=True)
        return progress
    run.load_images(images)
    if run.order is not None and len(run.order) != len(run.images):
        raise SystemExit(f"error: {run.file} was trained on {len(run.order)} images, {images} holds {len(run.images)}; "
                         f"train into another run directory")
    print(f"{run.peer}: training from {progress.seconds:.0f} s ({progress.steps} steps) to {seconds:.0f} s on "
          f"{len(run.images)} images, {run.parameters():,} parameters, {run.device}", flush=True)
    shown = time.monotonic()
    while progress.seconds < seconds:
        wait_while_held()
        start = time.perf_counter()
        count, loss = run.step()
        progress.seconds += time.perf_counter() - start
        progress.steps += 1
        progress.images += count
        if time.monotonic() - shown >= 30:
            shown = time.monotonic()
            print(f"{run.peer}: {progress.seconds:.0f}/{seconds:.0f} s, {progress.steps} steps, loss {loss:.4f}",
                  flush=True)
    run.save(progress)
    print(f"{run.peer}: {progress.steps} steps in {progress.seconds:.0f} s; checkpoint {run.file}", flush=True)
    return progress


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["train", "sample"])
    p.add_argument("peer", choices=PEERS)
    p.add_argument("--run-dir", type=Path, required=True, help="where its checkpoint lives")
    p.add_argument("--images", type=Path, help="train: the training images, a uint8 (N, 3, 32, 32) .npy")
    p.add_argument("--seconds", type=float, help="train: until the training clock reaches this")
    p.add_argument("--n", type=int, help="sample: how many")
    p.add_argument("--out", type=Path, help="sample: the .npy to write")
    p.add_argument("--seed", type=int, default=0, help="the model's initialisation (train) or the samples' noise")
    p.add_argument("--batch-size", type=int, default=100, help="sample: images per sampling batch")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--device", help="default: cuda where there is one, else cpu")
    a = p.parse_args(argv)
    needed = {"train": ("images", "seconds"), "sample": ("n", "out")}[a.command]
    if missing := [f"--{k}" for k in needed if getattr(a, k) is None]:
        p.error(f"{a.command} needs {' and '.join(missing)}")

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = PeerRun(a.peer, a.run_dir, device, seed=a.seed if a.command == "train" else 0)
    if a.command == "train":
        progress = train(run, a.images, a.seconds)
    else:
        progress = run.restore()
        if not progress.steps:
            raise SystemExit(f"error: {run.file} is missing: train {a.peer} first")
        write_images(a.out, run.sample(a.n, a.seed, a.batch_size))
        print(f"{a.peer}: {a.n} samples ({sampler_name(a.peer)}) written to {a.out}", flush=True)
    print(result_line(describe(run, progress, a.command)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
