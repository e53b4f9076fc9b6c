"""QuantConfig: how to quantize a DiT, and the one place its defaults live.

`QuantConfig(scheme="reference")` from Python is exactly `QuantDiT.py --scheme reference`:
the fields whose default depends on the scheme are resolved here, not in the CLI
(QuantDiT.py builds its argparse defaults and help from this class).

Scheme-dependent defaults (docs/METHOD.md §8):

    field             ditas    reference
    smoothing         select   search      (ditas: no smoothing and TAS at alpha 0.5 calibrated in turn, each with
    bias_correction   True     False        bias correction, the one nearer FP end to end kept: docs/METHOD.md §15,
                                            §16; the layer-wise search is --smoothing search; reference: the
                                            released code's search, no bias correction)
    act_granularity   row      tensor      (per batch row: a sample never depends on its neighbours)
    search_steps      None     50          (None = every calibration step; the released search
                                            scores the first 50, noisiest, steps only)
    svd               subspace full        (the LoRA fit's truncated SVD: one fit per alpha in the ditas
                                            scheme makes the full SVD its dominant cost, quant/method/lora.py)
    search            shortlist exact      (shortlist: the approximate search ranks every candidate from
                                            pass-1 statistics and the exact pass scores only the
                                            `search_shortlist` best (2); exact: it scores every candidate,
                                            the paper's search; with one alpha (fixed, none) always exact)
    calib_clip        auto     off         (x0 predictions of the FP calibration loops clipped to [-1, 1]: auto
                                            for pixel-space models only, as the sampling scripts sample them;
                                            off: the released code's clip_denoised=False; clips_x0())

`smoothing` is "fixed" when an `alpha` is given and the scheme's otherwise; `alpha` itself defaults to
0.5 (SmoothQuant's value).
"""
from dataclasses import asdict, dataclass, fields, replace

SCHEMES = ("ditas", "reference")
GRANULARITIES = ("tensor", "row", "token")


def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")


def _check_scheme(scheme):
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


@dataclass(frozen=True)
class WeightQuantConfig:
    """Weight quantizer settings.

    group_size: ditas only; consecutive input columns sharing a scale within one
    output row (None = one group per output row). The reference scheme's groups
    are fixed (32 rows of one column) and ignore it. symmetric: ditas only.
    """
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    scheme: str = "ditas"

    def __post_init__(self):
        _check_bits(self.bits)
        _check_scheme(self.scheme)
        if self.group_size is not None and (
                isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer or None, got {self.group_size!r}")
        if self.symmetric and self.scheme != "ditas":
            raise ValueError("symmetric weight quantization is only defined for the ditas scheme")


@dataclass(frozen=True)
class ActQuantConfig:
    """Dynamic asymmetric activation quantizer settings.

    granularity: "tensor" (one range for the whole tensor, the paper), "row" (one
    range per x[b], so a sample never depends on its batch neighbours), "token"
    (one range per last-dim vector).
    """
    bits: int = 8
    granularity: str = "tensor"
    scheme: str = "ditas"

    def __post_init__(self):
        _check_bits(self.bits)
        _check_scheme(self.scheme)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")


def alpha_grid(step=0.05):
    """[0, step, ..., 1] with exact decimals (21 values for 0.05)."""
    n = round(1 / step) if 0 < step <= 1 else 0  # (0, nan and inf divide nothing)
    if n < 1 or abs(n * step - 1) > 1e-9:
        raise ValueError(f"alpha step must divide 1, got {step}")
    return [round(k * step, 10) for k in range(n + 1)]


SCHEME_DEFAULT = "scheme default"  # sentinel of the fields resolved per scheme
_SCHEME_DEFAULTS = {"ditas": {"smoothing": "select", "act_granularity": "row", "search_steps": None, "svd": "subspace",
                              "search": "shortlist", "calib_clip": "auto", "bias_correction": True},
                    "reference": {"smoothing": "search", "act_granularity": "tensor", "search_steps": 50, "svd": "full",
                                  "search": "exact", "calib_clip": "off", "bias_correction": False}}
MATMUL_DTYPES = ("fp32", "bf16")
SEARCHES = ("exact", "shortlist", "approx")
DEFAULT_SHORTLIST = 2
SMOOTHINGS = ("search", "fixed", "none", "select")
SVDS = ("full", "lowrank", "subspace")
CALIB_CLIPS = ("auto", "on", "off")
LORA_ORDERS = ("residual", "svd_first")  # the low-rank branch: fitted on the residual, or taken out first (svd_branch)
LORA_INPUTS = ("quantized", "smoothed")  # what feeds a layer's branch: fq(x/s) (residual) or x/s (svd_first)
# fields added after checkpoints existed: to_dict records them only where they differ from this value, so a
# checkpoint of an existing setting is written byte for byte as before
DEFAULT_ALPHA = 0.5
DEFAULT_SELECT_FROM = ("none", DEFAULT_ALPHA)  # smoothing select's options: no smoothing, TAS at the default alpha
RECORDED_WHEN_SET = {"lora_order": "residual", "hadamard": False, "bias_correction": False,
                     "select_from": DEFAULT_SELECT_FROM}


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a DiT (quant.calibration.driver.quantize_dit). Every field is a QuantDiT.py flag; calib_clip sets
    the FP calibration loop that QuantDiT.py hands quantize_dit (clips_x0)."""
    scheme: str = "ditas"             # ditas (deployable integer form) | reference (the released numerics)
    weight_bit: int = 4
    act_bit: int = 8
    group_size: int | None = 128      # ditas: input columns per weight group; None = per output channel
    act_granularity: str = SCHEME_DEFAULT  # tensor | row | token dynamic activation ranges
    smoothing: str | None = None      # search | fixed | none | select (None: fixed if alpha is given, else the
                                      # scheme's)
    alpha: float | None = None        # the fixed alpha (None: 0.5)
    alpha_step: float = 0.05          # the searched grid {0, step, ..., 1}
    lora_rank: int = 32               # 0 = no LoRA branch
    lora_iters: int = 10
    svd: str = SCHEME_DEFAULT         # full | lowrank (randomized) | subspace (warm-started, quant/method/lora.py)
    search_steps: int | None | str = SCHEME_DEFAULT  # search loss over the first N steps (None: all)
    quantize_adaln: bool = False      # also quantize every block's adaLN linear, weight-only 8-bit
    search_dtype: str = "fp32"        # reference scheme: candidate products in fp32 or bf16
    search: str = SCHEME_DEFAULT      # exact: a second FP loop scores every candidate; shortlist: only the
                                      # best predicted from pass 1; approx: all predicted from pass 1
    search_shortlist: int | None | str = SCHEME_DEFAULT  # shortlist: candidates scored exactly (None otherwise)
    search_row_stride: int = 1        # exact/shortlist: score every N-th token row only (an approximation)
    calib_clip: str = SCHEME_DEFAULT  # auto | on | off: clip x0 to [-1, 1] in the FP calibration loops (clips_x0)
    lora_order: str = "residual"      # residual: LoRA fitted on the quantization residual, fed fq(x/s) (§5);
                                      # svd_first: SVD_r(W diag(s)) taken out before quantization, fed x/s in
                                      # 16-bit (SVDQuant's order, quant/svd_branch.py; ditas scheme)
    hadamard: bool = False            # rotate the inputs of proj (folded into qkv's V rows) and fc2 (online) by a
                                      # block Hadamard before calibration (quant/rotation.py)
    bias_correction: bool | str = SCHEME_DEFAULT  # one more FP loop after the search: every layer's mean output
                                      # error over the calibration loop moves into its bias (quant/calibration/bias.py)
    select_from: tuple = DEFAULT_SELECT_FROM  # smoothing select: the options calibrated in turn ("none" or a fixed
                                      # alpha); the one whose quantized calibration loop ends nearest the FP
                                      # loop's samples is kept (quant/calibration/select.py)

    def __post_init__(self):
        if self.scheme not in _SCHEME_DEFAULTS:
            raise ValueError(f"scheme must be one of {tuple(_SCHEME_DEFAULTS)}, got {self.scheme!r}")
        if self.smoothing is None:
            object.__setattr__(self, "smoothing", _SCHEME_DEFAULTS[self.scheme]["smoothing"] if self.alpha is None
                               else "fixed")
        if self.search == SCHEME_DEFAULT:  # resolved before the scheme's table: one alpha has nothing to rank
            object.__setattr__(self, "search", _SCHEME_DEFAULTS[self.scheme]["search"]
                               if self.smoothing == "search" else "exact")
        for name, value in _SCHEME_DEFAULTS[self.scheme].items():
            if getattr(self, name) == SCHEME_DEFAULT:
                object.__setattr__(self, name, value)
        if self.search_shortlist == SCHEME_DEFAULT:
            object.__setattr__(self, "search_shortlist", DEFAULT_SHORTLIST if self.search == "shortlist" else None)
        if self.alpha is None:
            object.__setattr__(self, "alpha", DEFAULT_ALPHA)
        if isinstance(self.select_from, list):  # (a checkpoint's JSON record)
            object.__setattr__(self, "select_from", tuple(self.select_from))
        self._validate()

    def _validate(self):
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if isinstance(self.search_row_stride, bool) or not isinstance(self.search_row_stride, int) \
                or self.search_row_stride < 1:
            raise ValueError(f"search row stride must be a positive integer, got {self.search_row_stride!r}")
        if self.search_row_stride != 1 and self.search == "approx":
            raise ValueError("the search row stride applies to the scoring pass (--search exact or shortlist)")
        if self.search == "shortlist":
            if self.smoothing != "search":
                raise ValueError("--search shortlist ranks the searched alphas: it needs --smoothing search")
            k = self.search_shortlist
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"the search shortlist must be a positive number of candidates, got {k!r}")
        elif self.search_shortlist is not None:
            raise ValueError(f"the search shortlist applies to --search shortlist only (this is --search {self.search})")
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be search, fixed, none or select, got {self.smoothing!r}")
        self._validate_select()
        if self.alpha_step != field_default("alpha_step") and self.smoothing != "search":
            raise ValueError(f"--alpha-step sets the searched alpha grid: it needs --smoothing search (this is "
                             f"--smoothing {self.smoothing})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"the fixed alpha must be in [0, 1], got {self.alpha}")
        if self.search_dtype not in MATMUL_DTYPES:
            raise ValueError(f"search dtype must be one of {MATMUL_DTYPES}, got {self.search_dtype!r}")
        if self.calib_clip not in CALIB_CLIPS:
            raise ValueError(f"calib clip must be one of {CALIB_CLIPS}, got {self.calib_clip!r}")
        if self.lora_order not in LORA_ORDERS:
            raise ValueError(f"lora order must be one of {LORA_ORDERS}, got {self.lora_order!r}")
        if self.lora_order == "svd_first":
            if self.scheme != "ditas":
                raise ValueError("--lora-order svd_first is a ditas-scheme option (the reference scheme shares "
                                 "one residual fit across alphas)")
            if self.lora_iters != field_default("lora_iters"):
                raise ValueError("--lora-iters sets the residual LoRA's alternating loop; --lora-order svd_first "
                                 "takes one SVD before quantization")
        if not isinstance(self.hadamard, bool):
            raise ValueError(f"hadamard must be True or False, got {self.hadamard!r}")
        if not isinstance(self.bias_correction, bool):
            raise ValueError(f"bias correction must be True or False, got {self.bias_correction!r}")
        if self.svd not in SVDS:
            raise ValueError(f"svd must be one of {SVDS}, got {self.svd!r}")
        if self.lora_rank < 0 or self.lora_iters < 1:
            raise ValueError(f"LoRA rank must be >= 0 and iterations >= 1, got {self.lora_rank}, {self.lora_iters}")
        if self.search_steps is not None and (isinstance(self.search_steps, bool)
                                              or not isinstance(self.search_steps, int) or self.search_steps < 1):
            raise ValueError(f"search steps must be a positive integer or None (all), got {self.search_steps!r}")
        self.weight_cfg()  # validates bits, scheme, group size
        self.act_cfg()

    def _validate_select(self):
        opts = self.select_from
        if not isinstance(opts, tuple) or not opts or any(
                o != "none" and (isinstance(o, (bool, str)) or not isinstance(o, (int, float)) or not 0 <= o <= 1)
                for o in opts):
            raise ValueError(f"the selected options must be 'none' or alphas in [0, 1], got {opts!r}")
        if len(set(opts)) != len(opts):
            raise ValueError(f"the selected options repeat one: {opts!r}")
        if opts != DEFAULT_SELECT_FROM and self.smoothing != "select":
            raise ValueError(f"--select-from lists the options of --smoothing select (this is --smoothing "
                             f"{self.smoothing})")

    def options(self):
        """The configs that calibrate in turn: this one, or with smoothing select one per select_from entry (no
        smoothing, or TAS at that fixed alpha; quant/calibration/select.py keeps one)."""
        if self.smoothing != "select":
            return [self]
        base = DEFAULT_SELECT_FROM
        return [replace(self, smoothing="none", select_from=base) if o == "none" else
                replace(self, smoothing="fixed", alpha=float(o), select_from=base) for o in self.select_from]

    def weight_cfg(self):
        return WeightQuantConfig(bits=self.weight_bit, group_size=self.group_size, scheme=self.scheme)

    def act_cfg(self):
        return ActQuantConfig(bits=self.act_bit, granularity=self.act_granularity, scheme=self.scheme)

    def alphas(self):
        """The candidate alphas: the grid, the fixed one, or [None] (no smoothing); smoothing select calibrates
        one option (options()) at a time, each with one."""
        if self.smoothing == "none":
            return [None]
        if self.smoothing == "select":
            return [self.alpha]
        if self.smoothing == "fixed":
            return [self.alpha]
        return alpha_grid(self.alpha_step)

    def clips_x0(self, pixel_space):
        """Whether the FP calibration loops clip x0 predictions to [-1, 1] (clip_denoised): calib_clip on or
        off, or auto: for pixel-space models (whose data lie in [-1, 1], and which sample.py and
        sample_merge_TAS.py sample clipped), never for latent ones. The loop is the caller's (QuantDiT.py):
        quantize_dit observes whatever trajectory it is given."""
        return self.calib_clip == "on" or (self.calib_clip == "auto" and pixel_space)

    def to_dict(self):
        """The fields as a dict (what a checkpoint records); RECORDED_WHEN_SET fields only where set."""
        return {k: v for k, v in asdict(self).items() if RECORDED_WHEN_SET.get(k, object()) != v}

    @classmethod
    def from_dict(cls, recorded):
        """The config a to_dict() (a checkpoint's record) describes: the RECORDED_WHEN_SET fields it omits take the
        value they are omitted at."""
        return cls(**{**RECORDED_WHEN_SET, **recorded})

    def changed(self):
        """{field: value} where this config differs from its scheme's defaults (names an output dir); the
        search fields against the defaults of its smoothing (one alpha: the exact search)."""
        base = QuantConfig(scheme=self.scheme)
        search_base = QuantConfig(scheme=self.scheme, smoothing=self.smoothing)
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(search_base if f.name.startswith("search") else base, f.name)}


def field_default(name, scheme=None):
    """A field's default: the class default, or the given scheme's resolution of it."""
    if scheme is not None:
        return getattr(QuantConfig(scheme=scheme), name)
    return next(f.default for f in fields(QuantConfig) if f.name == name)
