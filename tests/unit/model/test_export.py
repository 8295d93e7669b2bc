"""model/export.py: a D2FT checkpoint becomes a plain timm state dict."""

from __future__ import annotations

import torch

from lightning_d2ft.model.export import timm_state_dict


def test_timm_state_dict_strips_the_wrapper_prefix_and_loads_into_plain_timm(tmp_path, make_vit):
    vit = make_vit("tiny3")
    state = {f"net.vit.{k}": v for k, v in vit.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "m.ckpt")
    plain = make_vit("tiny3")
    plain.load_state_dict(timm_state_dict(tmp_path / "m.ckpt"))  # strict: every key matches
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in vit.state_dict().items())
