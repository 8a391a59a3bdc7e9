"""Flag defaults and factories shared by every script.

Defaults live in plain dicts (`model_and_diffusion_defaults`, `classifier_defaults`,
...) with their help text (`FLAG_HELP`, `FLAG_ALIASES`); `cli.add_flags` turns them into
`--key value` flags (booleans are `--flag True/False`), and the `create_*` functions build
networks and diffusions from the same keys. The checks that turn a bad image size or
attention resolution into a one-line error naming the flag live here, because
this is where flag names are known: the diffusion and network modules below raise
`errors.ParameterError` naming their parameters, and the factories here name the flag instead.
"""

from . import gaussian_diffusion as gd
from .cli import UserError, flag_names
from .cli import str2bool  # noqa: F401 (re-exported for scripts that import it from here)
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, UNetModel

# channel_mult used when --channel_mult is empty, by image size.
DEFAULT_CHANNEL_MULT = {
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    224: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    512: (0.5, 1, 1, 2, 2, 4, 4),
}

CLASSIFIER_TYPES = ("encoder", "resnet18", "resnet50", "resnet101")


def diffusion_defaults():
    """Diffusion flags. T=4000 with a linear schedule is the configuration of the paper."""
    return dict(
        learn_sigma=False,
        diffusion_steps=4000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=True,
    )


def model_and_diffusion_defaults():
    """UNet (class-conditional, as CDM needs) plus diffusion flags."""
    return dict(
        image_size=64,
        in_channels=1,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=True,
        num_classes=2,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        **diffusion_defaults(),
    )


def classifier_defaults():
    """Noise-conditioned classifier flags (`--model_type encoder|resnet18|resnet50|resnet101`)."""
    return dict(
        image_size=64,
        in_channels=1,
        num_classes=2,
        model_type="encoder",
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_channel_mult="",
        classifier_num_head_channels=64,
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
        resnet_keep_resolution=False,
    )


def classifier_and_diffusion_defaults():
    return dict(**classifier_defaults(), **diffusion_defaults())


# ---------------------------------------------------------------------------------------------
# Shape checks that name the flag


def parse_channel_mult(image_size, channel_mult, flag="--channel_mult"):
    """Per-level channel multipliers: the explicit comma list, else the default for the size."""
    if channel_mult:
        if isinstance(channel_mult, str):
            try:
                mult = tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
            except ValueError:
                raise UserError(f"{flag} {channel_mult!r}: expected comma-separated numbers, e.g. 1,2,3,4")
        else:
            mult = tuple(channel_mult)
    elif image_size in DEFAULT_CHANNEL_MULT:
        mult = DEFAULT_CHANNEL_MULT[image_size]
    else:
        sizes = ", ".join(str(s) for s in DEFAULT_CHANNEL_MULT)
        raise UserError(
            f"--image_size {image_size} has no default channel_mult (defaults exist for {sizes}); "
            f"pass {flag}, e.g. 1,2,2,4"
        )
    levels = len(mult)
    if image_size % 2 ** (levels - 1):
        raise UserError(
            f"--image_size {image_size} cannot be halved {levels - 1} times as {flag} "
            f"{','.join(str(m) for m in mult)} needs; choose a size divisible by {2 ** (levels - 1)}"
        )
    return mult


def attention_downsample_factors(image_size, resolutions, levels, flag="--attention_resolutions"):
    """Convert feature-map resolutions (e.g. "16,8") into the UNet's downsample factors.

    Every resolution must be the size of some feature map, otherwise the flag would silently add
    no attention (the original code's behaviour at 224 pixels).
    """
    occurring = {image_size // 2**k: 2**k for k in range(levels)}
    factors = []
    for item in str(resolutions).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            res = int(item)
        except ValueError:
            raise UserError(f"{flag} {resolutions!r}: expected comma-separated integers, e.g. 16,8")
        if res not in occurring:
            sizes = ",".join(str(s) for s in sorted(occurring, reverse=True))
            raise UserError(
                f"{flag} {resolutions}: resolution {res} never occurs at --image_size {image_size} "
                f"(feature maps are {sizes})"
            )
        factors.append(occurring[res])
    return tuple(factors)


# GroupNorm in the UNet and the encoder splits every feature map into this many groups.
NORM_GROUPS = 32


def _at_least(value, low, flag):
    if value < low:
        raise UserError(f"{flag} {value}: must be at least {low}")


def check_widths(width, mult, flag, mult_flag):
    """Every level's width int(m * width) must be a positive multiple of the group norm's 32 groups."""
    _at_least(width, 1, flag)
    if any(m <= 0 for m in mult):
        raise UserError(f"{mult_flag} {','.join(str(m) for m in mult)}: multipliers must be positive")
    widths = [int(m * width) for m in mult]
    if any(w < NORM_GROUPS or w % NORM_GROUPS for w in widths):
        raise UserError(
            f"{flag} {width}: the level widths ({flag} x {mult_flag} = {','.join(str(w) for w in widths)}) "
            f"must be multiples of {NORM_GROUPS} (the group norm's groups); use e.g. {flag} "
            f"{max(NORM_GROUPS, -(-width // NORM_GROUPS) * NORM_GROUPS)}"
        )
    return widths


def check_heads(widths, num_heads, num_head_channels, heads_flag, channels_flag):
    """Attention layers of `widths` channels split into heads: of num_head_channels each, or num_heads of them."""
    if num_head_channels != -1:
        if num_head_channels < 1:
            alternative = f", or -1 to use {heads_flag}" if heads_flag else ""
            raise UserError(f"{channels_flag} {num_head_channels}: must be positive{alternative}")
        for w in widths:
            if w % num_head_channels:
                raise UserError(
                    f"{channels_flag} {num_head_channels} does not divide the {w} channels of an attention layer "
                    f"(attention widths: {','.join(str(x) for x in sorted(set(widths)))}); choose a divisor such as "
                    f"{NORM_GROUPS}"
                )
        return
    if heads_flag is None:
        return
    _at_least(num_heads, 1, heads_flag)
    for w in widths:
        if w % num_heads:
            raise UserError(f"{heads_flag} {num_heads} does not divide the {w} channels of an attention layer")


def _network_flags(prefix=""):
    """{parameter of UNetModel / EncoderUNetModel: the flag that feeds it}, for `flag_names`."""
    names = ("channel_mult", "attention_resolutions", "num_head_channels", "pool")
    return {"image_size": "--image_size", **{name: f"--{prefix}{name}" for name in names}}


def _attention_widths(widths, attention_ds):
    """Widths of the attention layers: the levels with attention, and the middle block."""
    return [w for level, w in enumerate(widths) if 2**level in attention_ds] + [widths[-1]]


# ---------------------------------------------------------------------------------------------
# Factories


def _require_keys(config, expected, what):
    missing = sorted(set(expected) - set(config))
    unknown = sorted(set(config) - set(expected))
    if missing or unknown:
        raise TypeError(f"{what}: missing {missing}, unknown {unknown}")


def create_model_and_diffusion(**config):
    """(UNet, diffusion) from exactly the keys of `model_and_diffusion_defaults()`."""
    _require_keys(config, model_and_diffusion_defaults(), "create_model_and_diffusion")
    model_keys = {k: v for k, v in config.items() if k not in diffusion_defaults()}
    model = create_model(**model_keys, learn_sigma=config["learn_sigma"])
    return model, diffusion_from_config(config)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    in_channels=1,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    num_classes=2,
    use_checkpoint=False,
    attention_resolutions="16,8",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
):
    """The denoising UNet; its output has twice the input channels when sigma is learned."""
    _at_least(image_size, 1, "--image_size")
    _at_least(in_channels, 1, "--in_channels")
    mult = parse_channel_mult(image_size, channel_mult)
    attention_ds = attention_downsample_factors(image_size, attention_resolutions, len(mult))
    widths = check_widths(num_channels, mult, "--num_channels", "--channel_mult")
    _at_least(num_res_blocks, 0, "--num_res_blocks")
    attention_widths = _attention_widths(widths, attention_ds)
    check_heads(attention_widths, num_heads, num_head_channels, "--num_heads", "--num_head_channels")
    if num_heads_upsample != -1:
        if num_heads_upsample < 1:
            raise UserError(f"--num_heads_upsample {num_heads_upsample}: must be positive, or -1 (as --num_heads)")
        if num_head_channels == -1:  # the decoder's attention layers (the levels with attention)
            check_heads(attention_widths[:-1], num_heads_upsample, -1, "--num_heads_upsample", None)
    if not 0 <= dropout < 1:
        raise UserError(f"--dropout {dropout}: must be in [0, 1)")
    if class_cond and num_classes < 2:
        raise UserError(f"--num_classes {num_classes}: a class-conditional model needs at least 2 classes")
    _at_least(num_classes, 1, "--num_classes")
    with flag_names(_network_flags()):
        return UNetModel(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=num_channels,
            out_channels=in_channels * (2 if learn_sigma else 1),
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_ds,
            dropout=dropout,
            channel_mult=mult,
            num_classes=num_classes if class_cond else None,
            use_checkpoint=use_checkpoint,
            use_fp16=use_fp16,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )


def create_classifier(
    image_size,
    in_channels=1,
    num_classes=2,
    model_type="encoder",
    classifier_use_fp16=False,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_channel_mult="",
    classifier_num_head_channels=64,
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
    resnet_keep_resolution=False,
):
    """A noise-conditioned classifier: the UNet encoder, or a timestep-aware ResNet-18/50/101."""
    _at_least(image_size, 1, "--image_size")
    _at_least(in_channels, 1, "--in_channels")
    _at_least(num_classes, 2, "--num_classes")
    if model_type.startswith("resnet") and model_type in CLASSIFIER_TYPES:
        from .resnet import ResNetClassifier

        return ResNetClassifier(depth=int(model_type[len("resnet"):]), in_channels=in_channels, num_classes=num_classes,
                                keep_resolution=resnet_keep_resolution)
    if model_type != "encoder":
        raise UserError(f"--model_type {model_type!r}: choose one of {', '.join(CLASSIFIER_TYPES)}")
    mult = parse_channel_mult(image_size, classifier_channel_mult, flag="--classifier_channel_mult")
    attention_ds = attention_downsample_factors(
        image_size, classifier_attention_resolutions, len(mult), flag="--classifier_attention_resolutions"
    )
    widths = check_widths(classifier_width, mult, "--classifier_width", "--classifier_channel_mult")
    _at_least(classifier_depth, 0, "--classifier_depth")
    from .unet import POOLS

    if classifier_pool not in POOLS:
        raise UserError(f"--classifier_pool {classifier_pool!r}: choose one of {', '.join(POOLS)}")
    if classifier_pool == "attention" and classifier_num_head_channels == -1:
        raise UserError("--classifier_num_head_channels -1: --classifier_pool attention needs a head width, e.g. 32")
    pooled = [widths[-1]] if classifier_pool == "attention" else []
    # The encoder's attention layers use one head unless a head width is given.
    check_heads(_attention_widths(widths, attention_ds) + pooled, 1, classifier_num_head_channels, None,
                "--classifier_num_head_channels")
    with flag_names(_network_flags("classifier_")):
        return EncoderUNetModel(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=classifier_width,
            out_channels=num_classes,
            num_res_blocks=classifier_depth,
            attention_resolutions=attention_ds,
            channel_mult=mult,
            use_fp16=classifier_use_fp16,
            num_head_channels=classifier_num_head_channels,
            use_scale_shift_norm=classifier_use_scale_shift_norm,
            resblock_updown=classifier_resblock_updown,
            pool=classifier_pool,
        )


def diffusion_from_config(config):
    """The Gaussian diffusion described by the diffusion keys of a flat flag dict."""
    return create_gaussian_diffusion(
        steps=config["diffusion_steps"],
        learn_sigma=config["learn_sigma"],
        noise_schedule=config["noise_schedule"],
        use_kl=config["use_kl"],
        predict_xstart=config["predict_xstart"],
        rescale_timesteps=config["rescale_timesteps"],
        rescale_learned_sigmas=config["rescale_learned_sigmas"],
        timestep_respacing=config.get("timestep_respacing", ""),
    )


def create_gaussian_diffusion(
    *,
    steps=4000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=True,
    timestep_respacing="",
):
    """A SpacedDiffusion (all `steps` when `timestep_respacing` is empty)."""
    _at_least(steps, 1, "--diffusion_steps")
    flags = {"schedule_name": "--noise_schedule", "num_diffusion_timesteps": "--diffusion_steps",
             "section_counts": "--timestep_respacing"}
    with flag_names(flags):
        betas = gd.get_named_beta_schedule(noise_schedule, steps)
        use_timesteps = space_timesteps(steps, timestep_respacing or [steps])
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        var_type = gd.ModelVarType.FIXED_SMALL
    else:
        var_type = gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=use_timesteps,
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


# ---------------------------------------------------------------------------------------------
# Help text of the model and diffusion flags (built by `cli.add_flags`)

# Alternative spellings accepted on the command line (the original scripts used --img_size).
FLAG_ALIASES = {"image_size": ["--img_size"]}

FLAG_HELP = {
    "image_size": "image side in pixels (also --img_size); 32, 64, 128, 224, 256 have default channel_mult",
    "in_channels": "image channels: 1 for one modality, 4 for the four BraTS modalities",
    "num_channels": "base width of the UNet",
    "num_res_blocks": "residual blocks per UNet level",
    "num_heads": "attention heads (ignored when --num_head_channels is set)",
    "num_heads_upsample": "attention heads in the decoder (-1: same as --num_heads)",
    "num_head_channels": "channels per attention head (-1: use --num_heads)",
    "attention_resolutions": "feature-map sizes (pixels) that get self-attention, comma-separated",
    "channel_mult": "width multiplier per level, comma-separated (empty: the default for --image_size)",
    "dropout": "dropout rate in the residual blocks",
    "class_cond": "condition the UNet on the image-level label (CDM needs True)",
    "num_classes": "number of image-level classes (rows of the label embedding)",
    "use_checkpoint": "gradient checkpointing: less memory, slower",
    "use_scale_shift_norm": "inject the time/label embedding as a scale and shift of the group norm",
    "resblock_updown": "down/upsample with residual blocks instead of strided/upsampling convolutions",
    "use_fp16": "float16 (GPU): autocast with loss scaling when training, float16 weights when sampling",
    "use_new_attention_order": "split q/k/v before the heads (new order) instead of after (legacy)",
    "learn_sigma": "learn the reverse-process variance (hybrid loss with the variational bound)",
    "diffusion_steps": "number of diffusion steps T",
    "noise_schedule": "beta schedule: linear or cosine",
    "timestep_respacing": "use a subset of the steps when sampling: e.g. 250, ddim25 or 10,15,20",
    "use_kl": "train on the variational bound (rescaled KL) instead of the noise MSE",
    "predict_xstart": "the network predicts x0 instead of the noise",
    "rescale_timesteps": "feed the network t*1000/T instead of t",
    "rescale_learned_sigmas": "scale the variational-bound term by T/1000 (the improved-DDPM hybrid loss)",
    "model_type": "classifier network: encoder (half UNet), resnet18, resnet50 or resnet101",
    "resnet_keep_resolution": "ResNet without the stem's max-pool and with stride 1 in layer 4: its last feature map is "
    "1/8 of the image (8x8 at 64 px) instead of 1/32, so CAM maps are not limited by resolution",
    "classifier_use_fp16": "float16 (GPU): autocast with loss scaling when training, float16 weights when sampling",
    "classifier_width": "base width of the encoder classifier",
    "classifier_depth": "residual blocks per encoder level",
    "classifier_attention_resolutions": "feature-map sizes with self-attention in the encoder classifier",
    "classifier_channel_mult": "encoder width multiplier per level (empty: the default for --image_size)",
    "classifier_num_head_channels": "channels per attention head in the encoder classifier",
    "classifier_use_scale_shift_norm": "scale-shift injection of the time embedding in the encoder",
    "classifier_resblock_updown": "downsample with residual blocks in the encoder",
    "classifier_pool": "encoder head: attention, adaptive, spatial or spatial_v2",
}
