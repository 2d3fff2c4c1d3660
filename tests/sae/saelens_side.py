"""Load SAEs with SAELens' own loaders and write their latents and outputs (run by
test_saelens_crosscheck.py in a subprocess, with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set).

argv: spec.json out.npz. Each spec: {"name", "how": "hf"|"disk", "loader", "repo", "folder",
"overrides", "path", "x" (npy path)}.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from sae_lens import SAE
from sae_lens.loading import pretrained_sae_loaders as psl
from safetensors import safe_open


def local_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
    # SAELens reads these by HTTP range requests; offline, read the cached file's header instead
    with safe_open(hf_hub_download(repo_id, filename), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


psl.get_safetensors_tensor_shapes = local_shapes


def build(cfg_dict: dict, state: dict) -> SAE:  # the steps of SAE.from_pretrained
    cfg_dict = psl.handle_config_defaulting(cfg_dict)
    sae_cfg = SAE.get_sae_config_class_for_architecture(cfg_dict["architecture"]).from_dict(
        cfg_dict
    )
    sae = SAE.get_sae_class_for_architecture(sae_cfg.architecture())(sae_cfg)
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state)
    return sae


def main() -> None:
    specs = json.loads(open(sys.argv[1]).read())
    out = {}
    for s in specs:
        if s["how"] == "hf":
            loader = psl.NAMED_PRETRAINED_SAE_LOADERS[s["loader"]]
            cfg, state, _ = loader(
                repo_id=s["repo"],
                folder_name=s["folder"],
                device="cpu",
                force_download=False,
                cfg_overrides=s.get("overrides"),
            )
            sae = build(cfg, state)
        else:
            sae = SAE.load_from_disk(s["path"], device="cpu")
        x = torch.from_numpy(np.load(s["x"]))
        with torch.no_grad():
            f = sae.encode(x)
            out[s["name"] + "/arch"] = np.array(sae.cfg.architecture())
            out[s["name"] + "/f"] = f.numpy()
            out[s["name"] + "/y"] = sae(x).numpy()
    np.savez(sys.argv[2], **out)


if __name__ == "__main__":
    main()
