"""mae.py — the Masked Autoencoder objective (He et al., 2021), exactly as the original.

The encoder is vit.py's VisionTransformer run on the visible 25% of patches only; a light decoder
(512 wide, 8 blocks) sees all tokens (visible ones + a learned mask token) and predicts the pixels
of every patch; the loss is the MSE over the removed patches. With `norm_pix_loss` (default) each
target patch is normalised by its own mean and variance first.

State-dict keys follow the official layout: encoder keys at top level (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.N.*`, `norm`) plus `mask_token`, `decoder_embed`,
`decoder_pos_embed`, `decoder_blocks.N.*`, `decoder_norm`, `decoder_pred`; official MAE checkpoints
load with `load_state_dict`, and `encoder_state_dict()` loads into a VisionTransformer. weights.py
loads them also into a model of another image size or band count (ImageNet RGB weights, multispectral chips).

    model = MaskedAutoencoder(get_config("vit_base"))
    loss, pred, mask = model(imgs)            # imgs (B, C, H, W), normalised
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vit import Block, ViTConfig, VisionTransformer, sincos_pos_embed_2d, transformer_flops, vit_forward_flops


class MaskedAutoencoder(VisionTransformer):
    """MAE with a ViT encoder. Subclasses VisionTransformer so the encoder keys stay top-level."""

    def __init__(
        self,
        cfg: ViTConfig,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
    ):
        if decoder_embed_dim % decoder_num_heads != 0 or decoder_embed_dim % 4 != 0:
            raise ValueError(f"decoder_embed_dim {decoder_embed_dim} must be a multiple of 4 and of "
                             f"decoder_num_heads {decoder_num_heads}")
        super().__init__(cfg)
        self.norm_pix_loss = norm_pix_loss
        self.decoder_depth = decoder_depth
        Dd = decoder_embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_embed = nn.Linear(cfg.embed_dim, Dd)
        self.register_buffer("decoder_pos_embed", torch.zeros(1, cfg.num_patches + 1, Dd), persistent=True)
        self.decoder_blocks = nn.ModuleList(Block(Dd, decoder_num_heads, 4 * Dd) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, cfg.patch_size**2 * cfg.in_chans)
        # Once more over all parameters: one deterministic sequence for the whole model.
        self.init_weights()

    def init_buffers(self) -> None:
        super().init_buffers()
        with torch.no_grad():
            Dd = self.decoder_pos_embed.shape[-1]
            self.decoder_pos_embed.copy_(sincos_pos_embed_2d(Dd, self.cfg.grid_size)[None])

    def init_weights(self, seed: int = 0) -> None:
        if hasattr(self, "decoder_pred"):  # skip the encoder-only pass of VisionTransformer.__init__
            super().init_weights(seed)

    # ---- patches ----

    def patchify(self, imgs_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p·p·C), pixels within a patch in (row, column, channel) order."""
        p, C = self.cfg.patch_size, imgs_BCHW.shape[1]
        B, h, w = imgs_BCHW.shape[0], imgs_BCHW.shape[2] // p, imgs_BCHW.shape[3] // p
        x = imgs_BCHW.reshape(B, C, h, p, w, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)

    def unpatchify(self, x_BLP: torch.Tensor) -> torch.Tensor:
        """(B, L, p·p·C) -> (B, C, H, W), the inverse of patchify."""
        p, g, C = self.cfg.patch_size, self.cfg.grid_size, self.cfg.in_chans
        B = x_BLP.shape[0]
        x = x_BLP.reshape(B, g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * p, g * p)

    # ---- the three steps of the forward pass ----

    def random_masking(self, x_BLD: torch.Tensor, mask_ratio: float, noise_BL: torch.Tensor | None = None):
        """Keep a random int(L·(1 − mask_ratio)) patches per sample.

        Sorting per-sample uniform noise gives a random permutation; the lowest-noise patches are
        kept. Returns the kept tokens (B, K, D), the mask (B, L) with 1 = removed, and ids_restore
        (B, L), the inverse permutation that puts shuffled tokens back in image order.
        """
        B, L, D = x_BLD.shape
        num_visible = int(L * (1 - mask_ratio))
        if noise_BL is None:
            noise_BL = torch.rand(B, L, device=x_BLD.device)
        elif noise_BL.shape != (B, L):
            raise ValueError(f"noise must have shape (batch, num_patches) = {(B, L)}, got {tuple(noise_BL.shape)}")
        ids_shuffle = torch.argsort(noise_BL, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :num_visible]
        x_visible_BKD = torch.gather(x_BLD, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask_BL = torch.ones(B, L, device=x_BLD.device)
        mask_BL[:, :num_visible] = 0
        mask_BL = torch.gather(mask_BL, 1, ids_restore)  # back to image order
        return x_visible_BKD, mask_BL, ids_restore

    def forward_encoder(self, imgs_BCHW: torch.Tensor, mask_ratio: float, noise_BL: torch.Tensor | None = None):
        """Encode only the visible patches. Returns latent (B, 1 + K, D), mask (B, L), ids_restore."""
        self.check_input(imgs_BCHW)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        x_BLD = self.patch_embed(imgs_BCHW)
        pos_embed = self.pos_embed.to(x_BLD.dtype)  # fp32 buffer -> compute dtype (bf16 under FSDP)
        x_BLD = x_BLD + pos_embed[:, 1:]  # positions are added before masking, so they survive it
        x_BKD, mask_BL, ids_restore = self.random_masking(x_BLD, mask_ratio, noise_BL)
        cls_B1D = (self.cls_token + pos_embed[:, :1]).expand(x_BKD.shape[0], -1, -1)
        x_BKD = torch.cat([cls_B1D, x_BKD], dim=1)
        for block in self.blocks:
            x_BKD = block(x_BKD)
        return self.norm(x_BKD), mask_BL, ids_restore

    def forward_decoder(self, latent_BKD: torch.Tensor, ids_restore_BL: torch.Tensor) -> torch.Tensor:
        """Fill removed positions with the mask token, unshuffle, decode. Returns pred (B, L, p·p·C)."""
        x = self.decoder_embed(latent_BKD)
        B, K1, Dd = x.shape
        L = ids_restore_BL.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L + 1 - K1, -1)
        x_BLD = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order, cls dropped for now
        x_BLD = torch.gather(x_BLD, 1, ids_restore_BL.unsqueeze(-1).expand(-1, -1, Dd))
        x_BLD = torch.cat([x[:, :1], x_BLD], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x_BLD = block(x_BLD)
        # Drop the cls token before the head (the original drops it after: same values, less work).
        return self.decoder_pred(self.decoder_norm(x_BLD[:, 1:]))

    def patch_targets(self, imgs_BCHW: torch.Tensor) -> torch.Tensor:
        """What the decoder must predict per patch, (B, L, p·p·C), in fp32."""
        target = self.patchify(imgs_BCHW).float()
        if self.norm_pix_loss:
            # Each patch by its own statistics; unbiased variance and +1e-6 exactly as the original.
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs_BCHW: torch.Tensor, pred_BLP: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only. Always fp32."""
        per_patch_BL = ((pred_BLP.float() - self.patch_targets(imgs_BCHW)) ** 2).mean(dim=-1)
        # clamp: mask_ratio=0 removes nothing; the loss is then 0 rather than 0/0.
        return (per_patch_BL * mask_BL).sum() / mask_BL.sum().clamp_min(1)

    def forward(self, imgs_BCHW: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """Returns (loss, pred (B, L, p·p·C), mask (B, L) with 1 = removed)."""
        latent, mask_BL, ids_restore = self.forward_encoder(imgs_BCHW, mask_ratio, noise)
        pred_BLP = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs_BCHW, pred_BLP, mask_BL), pred_BLP, mask_BL

    # ---- pictures, encoder weights, FLOPs ----

    @torch.no_grad()
    def reconstruction_images(self, imgs_BCHW: torch.Tensor, pred_BLP: torch.Tensor, mask_BL: torch.Tensor):
        """(masked input, reconstruction, visible + reconstructed) in the input's space, each (B, C, H, W).

        With norm_pix_loss the decoder predicts normalised patches; they are mapped back with each
        target patch's own mean and std, else they look like noise (a frequent complaint about the
        original code). Undo the dataset normalisation afterwards to get pixel values.
        """
        pred = pred_BLP.float()
        if self.norm_pix_loss:
            target = self.patchify(imgs_BCHW).float()
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        recon = self.unpatchify(pred)
        mask_BCHW = self.unpatchify(mask_BL.float().unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
        imgs = imgs_BCHW.float()
        return imgs * (1 - mask_BCHW), recon, imgs * (1 - mask_BCHW) + recon * mask_BCHW

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder part, keys as a VisionTransformer (and official ViT checkpoints) expect."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}

    def forward_flops_per_image(self, mask_ratio: float = 0.75) -> int:
        return mae_forward_flops(self.cfg, mask_ratio, self.decoder_embed.out_features, self.decoder_depth)


def mae_forward_flops(cfg: ViTConfig, mask_ratio: float = 0.75, decoder_embed_dim: int = 512,
                      decoder_depth: int = 8) -> int:
    """Forward FLOPs of one MAE image: encoder on 1 + K visible tokens, decoder on 1 + L tokens.

    A training step costs 3x this (backward = 2x forward). The same convention as the reference MFU
    numbers of the official MAE code in docs/paper.md (section 11); train.py and tools/bench.py both use it.
    """
    L = cfg.num_patches
    K = int(L * (1 - mask_ratio))
    patch_dim = cfg.patch_size**2 * cfg.in_chans
    encoder = vit_forward_flops(cfg) - transformer_flops(L + 1, cfg.embed_dim, cfg.depth, cfg.mlp_dim)
    encoder += transformer_flops(K + 1, cfg.embed_dim, cfg.depth, cfg.mlp_dim)
    decoder = 2 * (K + 1) * cfg.embed_dim * decoder_embed_dim  # decoder_embed
    decoder += transformer_flops(L + 1, decoder_embed_dim, decoder_depth, 4 * decoder_embed_dim)
    decoder += 2 * L * decoder_embed_dim * patch_dim  # decoder_pred
    return encoder + decoder


def save_reconstruction_png(mae: MaskedAutoencoder, imgs_BCHW, pred_BLP, mask_BL, path, rgb_bands: list[int],
                            pixel_stats=None) -> None:
    """A PNG, one row per image: original | masked | reconstruction | pasted into the visible patches |
    error per removed patch, with a legend. Pixels are shown in data units (`pixel_stats`: the dataset's
    per-band (mean, std), undone), RGB from `rgb_bands` (one band: grey).

    With norm_pix_loss the reconstruction is drawn with each patch's *true* mean and std put back, so
    even an untrained model shows the right blobs there. The error panel is the honest one: the loss
    of each removed patch, in the loss's own units, grey 0.5 meaning "no better than predicting the
    patch's mean" (loss 1 with norm_pix_loss); visible patches, which carry no loss, are dark blue.
    """
    from PIL import Image, ImageDraw

    _, recon, pasted = mae.reconstruction_images(imgs_BCHW, pred_BLP, mask_BL)
    B, _, H, W = imgs_BCHW.shape
    to_image = lambda x_BLP: mae.unpatchify(x_BLP)[:, :1].expand(-1, 3, -1, -1)  # noqa: E731
    removed = to_image(mask_BL.float().unsqueeze(-1).expand_as(pred_BLP))
    target = mae.patchify(imgs_BCHW).float()
    if mae.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    error = to_image(((pred_BLP.float() - target) ** 2).mean(-1, keepdim=True).expand_as(pred_BLP))
    panels = [imgs_BCHW.float(), imgs_BCHW.float(), recon, pasted]
    if pixel_stats is not None:
        mean, std = (s.to(imgs_BCHW.device)[None, :, None, None] for s in pixel_stats)
        panels = [p * std + mean for p in panels]
    bands = (rgb_bands * 3)[:3]
    panels = [p[:, bands] for p in panels]
    # One contrast stretch for all three bands of an image (2-98 percentile of the original), so
    # band ratios, i.e. colours, survive; applied to every panel of the row alike.
    low = torch.quantile(panels[0].flatten(1), 0.02, dim=1)[:, None, None, None]
    high = torch.quantile(panels[0].flatten(1), 0.98, dim=1)[:, None, None, None]
    panels = [((p - low) / (high - low).clamp_min(1e-6)).clamp(0, 1) for p in panels]
    panels[1] = torch.where(removed > 0, torch.full_like(panels[1], 0.8), panels[1])  # removed: light grey
    dark_blue = torch.tensor([0.0, 0.0, 0.35], device=error.device)[None, :, None, None]
    panels.append(torch.where(removed > 0, (error / 2).clamp(0, 1), dark_blue.expand_as(error)))
    gap = torch.ones(B, 3, H, 2, device=imgs_BCHW.device)
    rows = torch.cat([x for p in panels for x in (p, gap)][:-1], dim=3)  # (B, 3, H, 5W + gaps)
    grid = torch.cat([x for r in rows for x in (r, torch.ones(3, 2, rows.shape[3], device=rows.device))][:-1], dim=1)
    scale = max(1, 128 // H)
    picture = Image.fromarray((grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8"))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    legend = ["original | masked | reconstruction | pasted | error of each removed patch",
              "reconstruction: each patch's true mean and std put back (norm-pix): judge the model by the error",
              "error: grey 0.5 = no better than the patch mean, black = exact; blue = visible (no loss)"]
    canvas = Image.new("RGB", (picture.width, picture.height + 12 * len(legend) + 4), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(legend if mae.norm_pix_loss else [legend[0], legend[2]]):
        draw.text((2, picture.height + 2 + 12 * i), line, fill="black")
    canvas.save(path)
