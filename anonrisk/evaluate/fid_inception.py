"""Inception features for FID/KID from a local weights file (never downloaded).

Two networks, told apart by the file's classifier head:
- **FID Inception** (1008-class head): the TF-ported Inception of the original FID code, as pytorch-fid,
  torch-fidelity / torchmetrics and clean-fid use it. Accepted files: pytorch-fid's
  ``pt_inception-2015-12-05-*.pth``, torch-fidelity's ``weights-inception-2015-12-05-*.pth`` (a plain
  state dict with the same parameter names as pytorch-fid's, ``fc`` of 1008 x 2048), or a ``.safetensors``
  of either. Its input transform is the TF graph's: uint8 pixels resized to 299 px with TF 1.x bilinear
  resizing (``align_corners=False``, no half-pixel offset, no antialiasing), then ``(x - 128) / 128``. Its
  pool blocks differ from torchvision's: average pools ignore the padding, and the last block max-pools.
  These are the features papers' FID and KID are computed on (torchmetrics with ``antialias=False``;
  torchmetrics' default ``antialias=True`` resize gives other numbers unless images are already 299 px).
- **torchvision Inception-v3** (1000-class head, e.g. ``inception_v3_google-*.pth``): built with
  ``transform_input=True`` (its weights expect that) and fed ImageNet-normalised, bilinear-resized (with
  antialiasing) images. Its FID ranks anonymizers but is **not** the paper FID; the results say so
  (``fid_features: torchvision-inception-v3``).
"""

from __future__ import annotations

import numpy as np

from anonrisk.errors import Unavailable

FID_INCEPTION = "fid-inception"
TORCHVISION_INCEPTION = "torchvision-inception-v3"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resize_bilinear_tf1(x, size: int):
    """TF 1.x ``resize_bilinear(align_corners=False)`` of an (N, C, H, W) float tensor: output pixel i
    samples the input at i * in / out (the legacy mapping without the half-pixel offset)."""
    import torch

    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    top, bottom, wy = axis(x.shape[2])
    left, right, wx = axis(x.shape[3])
    rows = x[:, :, top] + (x[:, :, bottom] - x[:, :, top]) * wy.view(1, 1, -1, 1)
    return rows[..., left] + (rows[..., right] - rows[..., left]) * wx


def _tf_blocks():
    """torchvision's Inception blocks with the TF graph's pooling (same parameters, same state-dict keys)."""
    import torch
    import torch.nn.functional as F
    from torchvision.models import inception as tv

    def avg_pool(x):  # TF's AvgPool averages only the pixels inside the image
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    def max_pool(x):  # the TF graph's last block max-pools here (kept: FID is defined on this graph)
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    class BlockA(tv.InceptionA):
        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool(x))], 1)

    class BlockC(tv.InceptionC):
        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = self.branch7x7dbl_1(x)
            for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                d = conv(d)
            return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x))], 1)

    class BlockE(tv.InceptionE):
        pool = staticmethod(avg_pool)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            return torch.cat([
                self.branch1x1(x),
                self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                self.branch_pool(self.pool(x)),
            ], 1)

    class BlockEMax(BlockE):
        pool = staticmethod(max_pool)

    return BlockA, BlockC, BlockE, BlockEMax


def fid_inception_v3():
    """The FID Inception architecture with random weights (1008-class head, TF pooling)."""
    import torchvision

    BlockA, BlockC, BlockE, BlockEMax = _tf_blocks()
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (BlockC(768, c) for c in (128, 160, 160, 192))
    net.Mixed_7b, net.Mixed_7c = BlockE(1280), BlockEMax(2048)
    return net


def _load(net, state: dict, label: str, path: str):
    """``net`` (built on the meta device: no random init to pay for) with the file's tensors, or Unavailable."""
    import torch

    expected = net.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    for k in expected:  # some converted files carry no BatchNorm step counters (never used in eval)
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, torch.tensor(0))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise Unavailable(f"FID/KID: evaluate.utility.fid_weights: {path} is not a {label} state dict "
                          f"({len(missing)} keys missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
                          f"{unexpected[:2]}; {len(wrong)} of another shape, e.g. {wrong[:2]})")
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    return net


class InceptionFeatures:
    """2048-d pool features of the network in a local weights file; ``kind`` says which (see the module doc)."""

    def __init__(self, state: dict, path: str, image_size: int = 299):
        import torch
        import torchvision

        fc = state.get("fc.weight")
        if fc is None or fc.ndim != 2 or fc.shape[1] != 2048 or fc.shape[0] not in (1008, 1000):
            shape = None if fc is None else tuple(fc.shape)
            raise Unavailable(f"FID/KID: evaluate.utility.fid_weights: {path} has no Inception-v3 classifier head "
                              f"(fc.weight {shape}; expected (1008, 2048) for the FID Inception or (1000, 2048) for torchvision's)")
        with torch.device("meta"):
            if fc.shape[0] == 1008:
                self.kind, net, label = FID_INCEPTION, fid_inception_v3(), "FID Inception (pytorch-fid / torch-fidelity)"
            else:
                self.kind, label = TORCHVISION_INCEPTION, "torchvision inception_v3"
                net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
        _load(net, state, label, path)
        net.fc = torch.nn.Identity()  # the 2048-d pool features (dropout is off in eval mode)
        self.net = net.eval()
        self.size = image_size

    def preprocess(self, images: np.ndarray):
        """uint8 (N, H, W, 3) -> the network's input (N, 3, size, size)."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        if self.kind == FID_INCEPTION:
            return (resize_bilinear_tf1(x, self.size) - 128) / 128
        x = F.interpolate(x / 255.0, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std  # transform_input=True maps this back to the [-1, 1] range the weights expect

    def __call__(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                out.append(self.net(self.preprocess(images[i : i + batch])).double())
        return torch.cat(out).numpy()
