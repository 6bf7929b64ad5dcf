"""HashNet backbones, checkpoint round trips, the Encoder, LR schedule and exact train-state restores."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rayhash.config import load_config
from rayhash.model import Encoder, HashNet, load_checkpoint, save_model_files


@pytest.mark.parametrize("backbone,size", [("tiny_cnn", 16), ("cifar_resnet", 32), ("resnet18", 64), ("resnet9", 32)])
def test_hashnet_shapes_and_range(backbone, size):
    torch.manual_seed(0)
    net = HashNet(backbone, bits=24, num_classes=7, width=8).eval()
    z, logits = net(torch.randn(3, 3, size, size))
    assert z.shape == (3, 24) and logits.shape == (3, 7)
    assert torch.all(z.abs() < 1)
    # logits are the classifier applied to z
    torch.testing.assert_close(logits, net.classifier(z))
    z2, none = HashNet(backbone, bits=16, num_classes=0, width=8)(torch.randn(2, 3, size, size))
    assert none is None and z2.shape == (2, 16)


def test_cifar_resnet_keeps_resolution_in_stem():
    net = HashNet("cifar_resnet", bits=16)
    assert net.backbone.conv1.kernel_size == (3, 3) and net.backbone.conv1.stride == (1, 1)
    assert isinstance(net.backbone.maxpool, torch.nn.Identity)


def test_pretrained_weights_from_local_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pt")
    net = HashNet("resnet18", bits=16, pretrained=str(tmp_path / "r18.pt"))
    torch.testing.assert_close(net.backbone.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises((ValueError, RuntimeError)):
        HashNet("resnet18", bits=16, pretrained=str(tmp_path / "r34.pt"))


def test_hash_norm_centres_every_bit():
    """With hash_norm, a hash layer whose bias pushes every unit to one side still gives balanced, unsaturated bits
    in training mode (BatchNorm centres each pre-activation on the batch); without it the bits are constant."""
    torch.manual_seed(0)
    x = torch.randn(256, 3, 16, 16)
    for norm in (False, True):
        net = HashNet("tiny_cnn", bits=16, width=8, hash_norm=norm)
        lin = net.hash[0] if norm else net.hash
        with torch.no_grad():
            lin.bias.fill_(5.0)
        z, _ = net.train()(x)
        balance = (torch.where(z >= 0, 1.0, -1.0).mean(0).abs().mean())
        assert (balance < 0.2) if norm else (balance == 1.0), (norm, balance)


def _saved_model(tmp_path, num_classes=5):
    cfg = load_config(None, ["model.backbone=tiny_cnn", "model.bits=32", "model.width=8", "data.image_size=16",
                             "model.hash_norm=true"])
    torch.manual_seed(1)
    net = HashNet.from_config(cfg.model, num_classes).eval()
    save_model_files(str(tmp_path / "ck"), net, cfg, {"num_classes": num_classes, "label_names": list("abcde")})
    return net, cfg


def test_checkpoint_round_trip_and_encoder(tmp_path):
    from PIL import Image

    from rayhash.data import eval_transform

    net, cfg = _saved_model(tmp_path)
    loaded = load_checkpoint(tmp_path / "ck")
    assert (loaded.bits, loaded.image_size, loaded.label_names) == (32, 16, list("abcde"))
    assert not loaded.model.training
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)[0].numpy()
    enc = Encoder(tmp_path / "ck", device="cpu")
    z, packed = enc.encode_tensor(x)
    np.testing.assert_allclose(z, ref, rtol=0, atol=1e-6)
    # independent packing: bit j of code i = (z_ij >= 0), big-endian within bytes
    bits = (ref >= 0).astype(np.uint8)
    expect = np.array([[int("".join(map(str, row[b:b + 8])), 2) for b in range(0, 32, 8)] for row in bits], np.uint8)
    np.testing.assert_array_equal(packed, expect)
    # images in every accepted form give the same codes as the eval transform + encode_tensor
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(3)]
    Image.fromarray(arrays[2]).save(tmp_path / "img.png")
    z_img, p_img = enc.encode_images([arrays[0], Image.fromarray(arrays[1]), str(tmp_path / "img.png")])
    tf = eval_transform(16)
    z_ref, p_ref = enc.encode_tensor(torch.stack([tf(Image.fromarray(a)) for a in arrays]))
    np.testing.assert_allclose(z_img, z_ref, atol=1e-6)
    np.testing.assert_array_equal(p_img, p_ref)


def test_load_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_checkpoint(tmp_path)


def test_lr_schedule_warmup_then_cosine():
    from rayhash.train import lr_lambda

    f = lr_lambda(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_code_stats_analytic():
    from rayhash.train import code_stats

    z = torch.tensor([[0.5, -1.0], [0.5, 0.2], [-0.5, 0.0]])
    s = code_stats(z)
    # bits: col0 signs (+,+,-) mean 1/3, col1 (-,+,+) mean 1/3 -> balance 1/3
    assert s["bit_balance"] == pytest.approx(1 / 3)
    # |z - sign z|: .5 0 .5 .8 .5 1 -> mean 3.3/6
    assert s["quant_error"] == pytest.approx(3.3 / 6)


def test_train_state_restore_is_exact(tmp_path):
    """Checkpoint -> restore reproduces model, optimizer and scheduler exactly, and the next step is identical."""
    from rayhash.train import build_training, load_train_state, loss_step, save_train_state

    cfg = load_config(None, ["model.backbone=tiny_cnn", "model.bits=16", "model.width=4", "train.epochs=2",
                             "train.warmup_epochs=1"])
    S = np.eye(3, dtype=np.float32) * 0.5 + 0.5
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(8, 3, 16, 16, generator=g), "label": torch.randint(0, 3, (8,), generator=g)}
               for _ in range(4)]

    def step(model, opt, sched, loss_fn, batch, seed):
        total, _, _ = loss_step(model, loss_fn, batch, cfg, torch.Generator().manual_seed(seed))
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()

    torch.manual_seed(0)
    model, opt, sched, loss_fn = build_training(cfg, 3, steps_per_epoch=3, similarity=S)
    for i, b in enumerate(batches[:3]):
        step(model, opt, sched, loss_fn, b, i)
    save_train_state(str(tmp_path), model, opt, sched, cfg, {"num_classes": 3}, {"epoch": 0, "step": 3})

    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    model2, opt2, sched2, loss_fn2 = build_training(cfg, 3, steps_per_epoch=3, similarity=S)
    state = load_train_state(str(tmp_path), model2, opt2, sched2)
    assert (state["epoch"], state["step"]) == (0, 3)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 3
    step(model, opt, sched, loss_fn, batches[3], 3)
    step(model2, opt2, sched2, loss_fn2, batches[3], 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_hash_layer_runs_in_float32_under_bf16_autocast():
    """Under bf16 autocast the backbone runs in bf16 but the codes do not: bf16 rounds tanh(4.0) to exactly 1.0
    (no gradient past ~3.5) and makes near-equal code distances tie."""
    torch.manual_seed(0)
    net = HashNet("tiny_cnn", 16, 5, width=4).eval()
    with torch.no_grad():
        net.hash.bias.fill_(4.0)  # pre-activations around 4: tanh(4) = 0.99933 in float32, 1.0 in bf16
        net.hash.weight.mul_(0.01)
    x = torch.randn(3, 3, 16, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        z, logits = net(x)
    assert z.dtype == torch.float32 and logits.dtype == torch.float32
    assert (z < 1.0).all() and torch.allclose(z, torch.tanh(torch.full_like(z, 4.0)), atol=1e-3)
    assert torch.tanh(torch.tensor(4.0, dtype=torch.bfloat16)).item() == 1.0  # what bf16 would have given
    z.sum().backward()
    assert net.hash.bias.grad.abs().min() > 0  # every unit still gets a gradient


def test_uint8_images_are_normalised_on_the_models_device_exactly_as_the_reference_formula():
    """The data pipeline ships uint8 (n,3,S,S) (a quarter of float32's bytes); the network normalises them itself.
    Independent reference: numpy ``(x/255 - mean) / std`` in float64, fed to the same network as floats."""
    from rayhash.data import IMAGE_MEAN, IMAGE_STD

    torch.manual_seed(0)
    net = HashNet("tiny_cnn", 16, 5, width=4).eval()
    x = np.random.default_rng(0).integers(0, 256, (6, 3, 16, 16), dtype=np.uint8)
    ref = (x / 255.0 - np.asarray(IMAGE_MEAN)[:, None, None]) / np.asarray(IMAGE_STD)[:, None, None]
    with torch.no_grad():
        z_u8, logits_u8 = net(torch.from_numpy(x))
        z_f, logits_f = net(torch.from_numpy(ref.astype(np.float32)))
        z_cl, _ = net(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(z_u8.numpy(), z_f.numpy(), atol=1e-5)
    np.testing.assert_allclose(logits_u8.numpy(), logits_f.numpy(), atol=1e-5)
    np.testing.assert_allclose(z_cl.numpy(), z_u8.numpy(), atol=1e-5)
    # normalisation keeps the memory format (channels_last stays channels_last on the way into the convolutions)
    from rayhash.model.network import normalise_images

    cl = normalise_images(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
    assert cl.dtype == torch.float32 and cl.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(cl.numpy(), ref, atol=1e-5)
