"""``fastrms.distributed.ShardedRMSprop``: the optimizer sharded across MPI ranks (ZeRO stage 1).

Data parallelism over mpi4py: every rank holds the full parameters in a :class:`fastrms.FlatParams`
and fills its whole gradient buffer; each rank owns one contiguous shard of each dtype's buffer
and keeps optimizer state for that shard only. A step reduce-scatters the gradients, updates the
own shard with the fused kernel and all-gathers the updated shards, bucket by bucket with
nonblocking collectives so that one bucket travels while another is updated.

A front end of the engine (:mod:`fastrms.engine`), as ``fastrms.RMSprop`` is: the rank's shard of
each dtype is one engine bucket (flat layout) holding that shard's state and step count; the
engine checks the hyperparameters and makes the coefficients (:meth:`Engine.plan`), switches on
buffers, and runs the kernel on each piece as its reduced gradient arrives
(:meth:`Bucket.run_range`). The layout of shards and pieces is :mod:`fastrms._shards`, the
checkpoint forms :mod:`fastrms._shard_state` (over :mod:`fastrms.checkpoint`), the collective
agreement check :mod:`fastrms._agreement`.

mpi4py is imported when an optimizer is built, never by ``import fastrms``.
"""
from __future__ import annotations

from numbers import Integral

import numpy as np

from . import _dispatch, checkpoint, presets
from ._agreement import RankError, agree, as_plain, digest, mpi, raw_bits
from ._coefficients import check_real
from ._shard_state import (checked_shard_form, full_state_dict, shard_description,
                           state_dict_from_arrays, state_dict_to_arrays)
from .checkpoint import _STATE_NAMES
from ._shards import buckets, piece_elements, shard_bounds
from .engine import HYPERPARAMETERS, Bucket, Engine, StepCounts, check_hyperparameters
from .engine.precision import (PRECISION_DEFAULTS, PRECISION_OPTIONS,
                               check_master_has_targets, check_precision_options,
                               is_low_precision)
from .engine.compact import (DEFAULT_STATE_FORMAT, STATE_FORMAT, check_format_fits,
                             check_state_format)
from .flat import FlatParams
from ._codecs import BFLOAT16, FLOAT32

__all__ = ["DEFAULT_BUCKET_BYTES", "OPTIONS", "RankError", "ShardedRMSprop",
           "state_dict_from_arrays", "state_dict_to_arrays"]

#: Bytes of one bucket over all ranks' pieces (what a rank sends and receives per collective).
#: Measured with 2 ranks x 10^7 float32 on a shared 2-core machine: 2 MiB to 128 MiB are within
#: the noise of each other; below 1 MiB the synchronisation per bucket shows (64 KiB buckets:
#: about 5x slower). Smaller buckets overlap more where the network moves the data.
DEFAULT_BUCKET_BYTES = 2 << 20

#: The keyword options besides ``comm``, ``average`` and ``bucket_bytes``: ``fastrms.RMSprop``'s.
OPTIONS = HYPERPARAMETERS + PRECISION_OPTIONS + ("state_format", "preset", "backend",
                                                  "skip_nonfinite")
#: fastrms.RMSprop's blockwise8 blocks lie within each parameter; shards cut parameters.
BLOCKWISE8_REFUSED = ("state_format='blockwise8' is not sharded: fastrms.RMSprop's blocks lie "
                      "within each parameter, and shards cut parameters; use 'bfloat16'")
#: Stochastic rounding draws its bits per parameter array, and a shard cuts arrays.
STOCHASTIC_REFUSED = ("ShardedRMSprop rounds 16-bit parameters to nearest (with or without "
                      "master_weights); param_rounding='stochastic' draws its random bits per "
                      "parameter array, and a shard cuts arrays")


class ShardedRMSprop:
    """RMSprop over a :class:`fastrms.FlatParams` replicated on every rank of ``comm``, with the
    optimizer state sharded: each rank keeps state for 1/world of the elements.

    ``comm``: an mpi4py intracommunicator (default ``MPI.COMM_WORLD``). Every rank must build
    the optimizer over the same layout (arrays, shapes, dtypes) with the same options: this is
    checked at construction, collectively, and a disagreement raises ``ValueError`` on every
    rank. ``options`` are :class:`fastrms.RMSprop`'s (``lr``, ``alpha``, ..., ``preset``,
    ``backend``, ``skip_nonfinite``), with its defaults and meaning.

    ``step(grad_scale=None)``, called on every rank after each rank filled ``flat.grads`` with
    its local gradients, applies the update for the sum of the ranks' gradients, divided by the
    world size when ``average=True`` (the default), and leaves the updated parameters in every
    rank's ``flat.params``. The sum is taken in rank order, ``(g0 + g1) + g2 ...``, each addition
    rounded in the dtype, on whichever rank owns the element; the division by the world size
    (times ``grad_scale``) happens inside the fused pass. The bits are those of
    ``fastrms.RMSprop(flat).step(grad_scale=world * grad_scale)`` on one process whose gradient
    buffer holds that sum (``grad_scale=grad_scale`` with ``average=False``). With
    ``skip_nonfinite``, one NaN or infinity in the summed, unscaled gradients of any rank's shard
    makes every rank skip the step and return False. ``flat.grads`` is only read.

    Hyperparameters and schedules work as in ``fastrms.RMSprop``: ``param_groups[0]["lr"]``
    may change between steps (on every rank alike: each step checks that the ranks' kernel
    coefficients agree, with a few bytes of communication), and ``lr`` may be a callable of the
    1-based step number. ``param_groups[0]["params"]`` holds this rank's shard views.

    float16 / bfloat16 parameters keep float32 state (and master copy, ``master_weights=True``)
    and round to nearest; their gradient pieces are summed in float32 (widened exactly), so the
    bits are ``fastrms.RMSprop``'s stepped with those float32 sums (``param_rounding=
    "stochastic"`` is refused: its bits are drawn per array, and a shard cuts arrays).
    ``state_format="bfloat16"`` keeps the shard's state in bfloat16; ``"blockwise8"`` is refused.

    Checkpoints: :meth:`state_dict` is this rank's shard; :meth:`consolidated_state_dict`
    gathers, on one rank, what ``fastrms.RMSprop(flat).state_dict()`` would hold;
    :meth:`load_state_dict` takes either (the full form on any number of ranks).

    ``bucket_bytes`` sets the size of the pieces that travel together (all ranks' pieces of
    one bucket; default :data:`DEFAULT_BUCKET_BYTES`). Each shard starts on a 256-element block
    (see :mod:`fastrms._shards`); ranks beyond the number of blocks hold empty shards.

    Example (one process is a world of one; run the same under ``mpiexec -n 4``):
        >>> import numpy as np, fastrms
        >>> from fastrms.distributed import ShardedRMSprop
        >>> flat = fastrms.FlatParams([np.ones((300, 4), np.float32), np.zeros(10, np.float64)])
        >>> opt = ShardedRMSprop(flat, lr=1e-2, momentum=0.9)
        >>> flat.grads[0][...] = 0.5                   # this rank's local gradients
        >>> opt.step()
        True
        >>> bool(flat.params[0][0, 0] < 1.0)
        True
        >>> full = opt.consolidated_state_dict()       # on rank 0; None elsewhere
    """

    def __init__(self, flat, comm=None, *, average=True, bucket_bytes=DEFAULT_BUCKET_BYTES,
                 **options):
        MPI = mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py intracommunicator (MPI.Intracomm), got "
                            f"{type(comm).__name__}")
        self._MPI = MPI
        #: The communicator every collective of this optimizer runs on.
        self.comm = comm
        #: This rank and the number of ranks.
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        error = parts = None
        try:
            self._build(flat, average, bucket_bytes, options)
            parts = self._construction_parts()
        except Exception as exc:  # every rank must reach the exchange below, or the others hang
            error = exc
        agree(comm, error, parts, "ShardedRMSprop()")

    # -- construction (local) ----------------------------------------------------------------

    def _build(self, flat, average, bucket_bytes, options) -> None:
        if not isinstance(flat, FlatParams):
            raise TypeError(f"ShardedRMSprop needs a fastrms.FlatParams, got {type(flat).__name__}")
        if not isinstance(average, (bool, np.bool_)):
            raise TypeError(f"average must be a bool, got {type(average).__name__}")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, Integral):
            raise TypeError(f"bucket_bytes must be an integer, got {type(bucket_bytes).__name__}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.flat = flat
        #: Divide the summed gradients by the world size (inside the fused pass).
        self.average = bool(average)
        self.bucket_bytes = int(bucket_bytes)
        world, rank = self.world_size, self.rank
        self._dtypes = list(flat.dtypes)
        self._sizes = [flat.param_buffers[d].size for d in self._dtypes]
        #: Per dtype (FlatParams order): every rank's shard, ``(lo, hi)`` in elements.
        self.bounds = tuple(shard_bounds(n, world) for n in self._sizes)
        #: Per dtype: this rank's shard.
        self.shard = tuple(b[rank] for b in self.bounds)
        group, backend = self._options(options)
        #: Per dtype: the dtypes of its gradient sums (float32 for 16-bit ones) and of its state.
        self._sum_dtypes = [FLOAT32 if is_low_precision(d) else d for d in self._dtypes]
        self._state_dtypes = [BFLOAT16 if group[STATE_FORMAT] == "bfloat16" else d
                              for d in self._sum_dtypes]
        self._engine = self._shard_engine(group, backend)
        self._buckets = []
        self._pieces = []  # per dtype: elements of one rank's piece of a bucket
        for d, dtype in enumerate(self._dtypes):
            piece = piece_elements(self.bucket_bytes, world, dtype.itemsize)
            self._pieces.append(piece)
            self._buckets.extend(buckets(self.bounds[d], piece, d))
        # 16-bit values travel as 2-byte integers (MPI has no bfloat16; the sums are ours).
        self._by_size = {2: self._MPI.UINT16_T, 4: self._MPI.FLOAT, 8: self._MPI.DOUBLE}
        self._mpi_types = [self._by_size[d.itemsize] for d in self._dtypes]
        #: Per rank, its row in a staging slot (None for this rank, whose piece stays in place).
        self._row_of_rank = [None if q == rank else q - (q > rank) for q in range(world)]
        # Two slots (one bucket arriving while the last one is summed and updated), each with
        # one row per peer; the reduced gradient of a bucket is summed into its first row.
        self._slots = [[np.empty((world - 1, piece), dtype) for dtype, piece in
                        zip(self._dtypes, self._pieces)] for _ in range(2 if world > 1 else 0)]
        self._wide_sums = [np.empty(piece, sum_dtype) if sum_dtype != dtype and world > 1
                           else None for dtype, sum_dtype, piece in
                           zip(self._dtypes, self._sum_dtypes, self._pieces)]
        # skip_nonfinite must see every reduced gradient before any update: they are kept whole.
        self._reduced = ([np.empty(hi - lo, sum_dtype) for sum_dtype, (lo, hi) in
                          zip(self._sum_dtypes, self.shard)]
                         if self.skip_nonfinite and world > 1 else None)
        self._routes = [self._route(bucket) for bucket in self._buckets] if world > 1 else []
        self._layout_digest = digest(repr([(str(d), o, n, s) for d, o, n, s in flat.layout]))

    def _options(self, options: dict) -> tuple[dict, str | None]:
        """``fastrms.RMSprop``'s options, resolved as it resolves them (the preset's defaults,
        then the explicit ones) and checked: the one parameter group (no ``params`` yet) and
        the backend name."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"ShardedRMSprop got unexpected options {unknown}; it takes "
                            f"comm, average, bucket_bytes and {', '.join(OPTIONS)}")
        preset = presets.get(options.get("preset"))
        defaults = preset.defaults()
        defaults.update((key, options[key]) for key in HYPERPARAMETERS if key in options)
        defaults.update((key, options.get(key, value)) for key, value in
                        PRECISION_DEFAULTS.items())
        #: The defaults the group starts from (the preset's, then the explicit arguments).
        self.defaults = defaults
        #: The preset in force ("torch" when none was named).
        self.preset = preset.name
        self._always_momentum = preset.always_momentum_buffer
        backend = options.get("backend")
        if backend is not None:
            _dispatch.load_requested(backend, "backend argument")  # fail now, not at step()
        skip_nonfinite = options.get("skip_nonfinite", False)
        if not isinstance(skip_nonfinite, (bool, np.bool_)):
            raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        self._skip_nonfinite = bool(skip_nonfinite)
        group = dict(defaults)
        if "lr" not in group:
            raise TypeError(f"param_groups[0]: lr is required with preset {preset.name!r} (the "
                            f"framework has no default learning rate)")
        check_hyperparameters(group, "param_groups[0]")
        group[STATE_FORMAT] = check_state_format(options.get(STATE_FORMAT, DEFAULT_STATE_FORMAT),
                                                 "param_groups[0]")
        if group[STATE_FORMAT] == "blockwise8":
            raise ValueError(f"param_groups[0]: {BLOCKWISE8_REFUSED}")
        check_format_fits(group[STATE_FORMAT], self._dtypes, "param_groups[0]")
        if check_precision_options(group, "param_groups[0]")[0] == "stochastic":
            raise ValueError(f"param_groups[0]: {STOCHASTIC_REFUSED}")
        check_master_has_targets(group, self._dtypes, "param_groups[0]")
        return group, backend

    def _shard_engine(self, group: dict, backend) -> Engine:
        """One engine bucket per dtype: this rank's shard of the flat parameter buffer, with its
        state at the initial values; the group's ``params`` are the shard views. Also the
        attributes :mod:`fastrms.checkpoint` reads (one parameter per dtype)."""
        counts = StepCounts(np.int64, chunk_size=len(self._dtypes))
        shard_buckets = []
        for dtype, (lo, hi) in zip(self._dtypes, self.shard):
            if not self.flat.param_buffers[dtype].flags.writeable:
                raise ValueError(f"flat.param_buffers[{dtype}] is read-only; parameters are "
                                 f"updated in place")
            view = self.flat.param_buffers[dtype][lo:hi]
            bucket = Bucket(0, dtype, [view], counts, [counts.new_slot()], view,
                            self.flat.grad_buffers[dtype][lo:hi],
                            state_format=group[STATE_FORMAT])
            bucket.allocate_initial(group, self._always_momentum)
            shard_buckets.append(bucket)
        group["params"] = [bucket.params[0] for bucket in shard_buckets]
        #: The one parameter group (as ``fastrms.RMSprop``'s; its ``params`` are shard views).
        self.param_groups = [group]
        self._group_indices = [list(range(len(shard_buckets)))]
        self._bucket_indices = [[d] for d in range(len(shard_buckets))]
        return Engine(shard_buckets, 1, backend=backend, always_momentum=self._always_momentum)

    def _route(self, bucket) -> tuple:
        """The MPI buffer specifications of one bucket, fixed for the optimizer's life: the
        reduce-scatter's send (each peer's piece, at its place in ``flat.grads``) and receive
        (this rank's piece from each peer, one row per peer, into either slot), and the
        all-gather's (every rank's piece at its place in ``flat.params``)."""
        d = bucket.dtype_index
        dtype, kind = self._dtypes[d], self._mpi_types[d]
        lo, hi = bucket.pieces[self.rank]
        send_counts = [0 if row is None else b - a
                       for row, (a, b) in zip(self._row_of_rank, bucket.pieces)]
        displs = [a for a, _ in bucket.pieces]
        receive_counts = [0 if row is None else hi - lo for row in self._row_of_rank]
        receive_displs = [0 if row is None else row * self._pieces[d]
                          for row in self._row_of_rank]
        send = [self.flat.grad_buffers[dtype], (send_counts, displs), kind]
        receive = [[slot[d], (receive_counts, receive_displs), kind] for slot in self._slots]
        gather = [self.flat.param_buffers[dtype], ([b - a for a, b in bucket.pieces], displs),
                  kind]
        return send, receive, gather

    def _construction_parts(self) -> dict:
        defaults = {key: "<callable>" if callable(value) else as_plain(value)
                    for key, value in self.defaults.items()}
        return {
            "parameter layout": (f"{len(self.flat)} arrays, elements per dtype "
                                 f"{dict(zip(map(str, self._dtypes), self._sizes))}, layout "
                                 f"digest {self._layout_digest}"),
            "options": repr({"preset": self.preset, **defaults,
                             "state_format": self.param_groups[0][STATE_FORMAT],
                             "skip_nonfinite": self.skip_nonfinite,
                             "average": self.average, "bucket_bytes": self.bucket_bytes}),
        }

    @property
    def skip_nonfinite(self) -> bool:
        """Skip (return False from, on every rank) a step whose summed gradients hold a NaN or an
        infinity; fixed at construction (it decides how the step is laid out)."""
        return self._skip_nonfinite

    # -- the step ----------------------------------------------------------------------------

    def step(self, *, grad_scale=None) -> bool:
        """One update from every rank's ``flat.grads``; True, or False (on every rank) for a
        step skipped by ``skip_nonfinite``. A collective call: every rank calls it."""
        error = parts = plan = None
        try:
            plan = self._plan(grad_scale)
            parts = {"kernel coefficients": repr([(c.values, c.flags) for _, c, _ in plan])}
        except Exception as exc:
            error = exc
        agree(self.comm, error, parts, "step()")
        engine = self._engine
        if self.skip_nonfinite:
            if not self._reduce_and_check(plan):
                return False
            engine.switch_on(plan)
            self._update_and_gather_reduced(plan)
        else:
            engine.switch_on(plan)
            self._exchange(plan)
        engine.advance(plan)
        return True

    def _plan(self, grad_scale) -> list:
        """The engine's plan for this step, ``(bucket, coefficients, backend module)`` per dtype
        (FlatParams order); validates everything and writes nothing."""
        scale = 1.0
        if grad_scale is not None:
            scale = check_real("grad_scale", grad_scale)
            if scale == 0.0:
                raise ValueError("grad_scale must be > 0, got 0.0")
        if self.average:
            scale *= self.world_size
        return self._engine.plan(self.param_groups, None if scale == 1.0 else scale)

    def _exchange(self, plan=None) -> None:
        """The overlapped step: bucket j+1's reduce-scatter is in flight while bucket j is summed
        and updated, and bucket j's all-gather starts as soon as it is. ``plan=None`` moves the
        data without updating anything (the benchmark's "collectives alone")."""
        gathers = []

        def update_and_send(j, grad):
            if plan is not None:
                self._update(j, grad, plan)
            gathers.append(self._post_gather(j))

        self._reduce_scatter(update_and_send)
        self._MPI.Request.Waitall([r for r in gathers if r is not None])

    def _reduce_and_check(self, plan) -> bool:
        """skip_nonfinite, first half: reduce-scatter every bucket, keeping the sums and
        checking each as it arrives; True when every rank found only finite values."""
        finite = [True]

        def check(j, grad):
            if finite[0] and grad.size:
                _, coeffs, module = plan[self._buckets[j].dtype_index]
                finite[0] = module.all_finite(coeffs, (grad,))

        self._reduce_scatter(check, into=self._reduced)
        return self.comm.allreduce(bool(finite[0]), op=self._MPI.LAND)

    def _update_and_gather_reduced(self, plan) -> None:
        """skip_nonfinite, second half: update each bucket from the kept sums, all-gather it."""
        gathers = []
        for j, bucket in enumerate(self._buckets):
            d = bucket.dtype_index
            lo, hi = bucket.pieces[self.rank]
            if self._reduced is None:  # a world of one: the gradients are the sums
                grad = self.flat.grad_buffers[self._dtypes[d]][lo:hi]
            else:
                shard_lo = self.shard[d][0]
                grad = self._reduced[d][lo - shard_lo:hi - shard_lo]
            self._update(j, grad, plan)
            gathers.append(self._post_gather(j))
        self._MPI.Request.Waitall([r for r in gathers if r is not None])

    def _reduce_scatter(self, consume, into=None) -> None:
        """For each bucket in turn: post the next bucket's exchange, wait for this one's, sum
        it in rank order and call ``consume(j, reduced_gradient_piece)``. With ``into`` (per
        dtype, a shard-sized buffer) the sums are kept there instead of in the arrival slot."""
        count = len(self._buckets)
        pending = self._post_reduce(0) if count else None
        for j in range(count):
            following = self._post_reduce(j + 1) if j + 1 < count else None
            if pending is not None:
                pending.Wait()
            consume(j, self._sum(j, into))
            pending = following

    def _post_reduce(self, j: int):
        """Nonblocking: each peer's piece of bucket j of this rank's gradients goes to that
        peer, straight from ``flat.grads`` (an all-to-all; no copy, no MPI reduction)."""
        if self.world_size == 1:
            return None
        send, receive_into_slot, _ = self._routes[j]
        return self.comm.Ialltoallv(send, receive_into_slot[j % 2])

    def _sum(self, j: int, into=None):
        """Bucket j's reduced gradient piece: the ranks' pieces added in rank order."""
        bucket = self._buckets[j]
        d = bucket.dtype_index
        lo, hi = bucket.pieces[self.rank]
        own = self.flat.grad_buffers[self._dtypes[d]][lo:hi]
        if self.world_size == 1:
            return own
        rows = self._slots[j % 2][d][:, :hi - lo]
        if into is not None:
            shard_lo = self.shard[d][0]
            out = into[d][lo - shard_lo:hi - shard_lo]
        elif self._wide_sums[d] is not None:
            out = self._wide_sums[d][:hi - lo]
        else:
            # Row 0 holds the lowest peer rank: always one of the first two terms, so the
            # first addition reads it before writing over it.
            out = rows[0]
        sources = [own if row is None else rows[row] for row in self._row_of_rank]
        # 16-bit pieces are widened to float32 (exactly) and summed there: out is float32.
        with np.errstate(over="ignore", invalid="ignore"):  # skip_nonfinite's business
            np.add(sources[0], sources[1], out=out, dtype=out.dtype)
            for source in sources[2:]:
                np.add(out, source, out=out, dtype=out.dtype)
        return out

    def _update(self, j: int, grad, plan) -> None:
        """The fused update of this rank's piece of bucket j, from its reduced gradient."""
        piece = self._buckets[j]
        d = piece.dtype_index
        lo, hi = piece.pieces[self.rank]
        if lo < hi:
            bucket, coeffs, module = plan[d]
            shard_lo = self.shard[d][0]
            bucket.run_range(coeffs, module, lo - shard_lo, hi - shard_lo, grad)

    def _post_gather(self, j: int):
        """Nonblocking: every rank's updated piece of bucket j into every rank's parameters."""
        if self.world_size == 1:
            return None
        return self.comm.Iallgatherv(self._MPI.IN_PLACE, self._routes[j][2])

    # -- state -------------------------------------------------------------------------------

    def flat_state(self) -> list[dict]:
        """Per dtype (FlatParams order): ``dtype``, ``bounds`` (this rank's shard, in elements of
        that dtype's buffer) and the shard's ``square_avg``, ``momentum_buffer``, ``grad_avg``
        and, for float16 / bfloat16 parameters with ``master_weights``, ``master_param`` (None
        when absent; float32 for 16-bit parameters): live buffers, element k belonging to
        element ``bounds[0] + k``."""
        return [{"dtype": bucket.dtype, "bounds": bounds,
                 **{name: None if bucket.flat[name] is None else bucket.flat[name][...]
                    for name in _STATE_NAMES}}
                for bucket, bounds in zip(self._engine.buckets, self.shard)]

    def _shard_description(self) -> dict:
        return shard_description(self.world_size, self.rank, self._dtypes, self._sizes,
                                 self.shard)

    def state_dict(self) -> dict:
        """This rank's shard (local, no communication): ``fastrms.RMSprop``'s layout with one
        entry per dtype holding the shard's elements, plus ``"shard"`` (world size, rank,
        bounds), which :meth:`load_state_dict` checks. Save one per rank (pickle, or np.savez
        through :func:`state_dict_to_arrays`)."""
        return {**checkpoint.state_dict(self), "shard": self._shard_description()}

    def consolidated_state_dict(self, root: int = 0):
        """Gather the whole state on rank ``root`` (collective): the dict
        ``fastrms.RMSprop(flat).state_dict()`` would return after the same steps; None on the
        other ranks. Loading it on any number of ranks continues the run."""
        error = parts = None
        try:
            if isinstance(root, bool) or not isinstance(root, Integral):
                raise TypeError(f"root must be an integer rank, got {type(root).__name__}")
            if not 0 <= root < self.world_size:
                raise ValueError(f"root must be a rank in [0, {self.world_size}), got {root}")
            hyper = checkpoint.group_entry(self.param_groups[0], checkpoint.group_keys(self),
                                           "param_groups[0]")
            shards = self.flat_state()
            names = [[n for n in _STATE_NAMES if s[n] is not None] for s in shards]
            step = self._engine.group_step(0)
            parts = {"root": str(root), "step": str(step), "buffers": repr(names),
                     "hyperparameters": repr(hyper)}
        except Exception as exc:
            error = exc
        agree(self.comm, error, parts, "consolidated_state_dict()")
        whole = []
        for d, (dtype, bounds) in enumerate(zip(self._dtypes, self.bounds)):
            gathered = {}
            counts = [hi - lo for lo, hi in bounds]
            displs = [lo for lo, _ in bounds]
            for name in names[d]:
                dtype_of = shards[d][name].dtype  # bfloat16 state, a float32 master copy
                kind = self._by_size[dtype_of.itemsize]
                target = np.empty(self._sizes[d], dtype_of) if self.rank == root else None
                self.comm.Gatherv(raw_bits(shards[d][name]),
                                  [raw_bits(target), (counts, displs), kind]
                                  if self.rank == root else None, root=root)
                gathered[name] = target
            whole.append(gathered)
        if self.rank != root:
            return None
        return full_state_dict(hyper, step, self.flat.layout, self._dtypes, whole)

    def load_state_dict(self, state_dict) -> None:
        """Restore either form (collective): the full form of :meth:`consolidated_state_dict` /
        ``fastrms.RMSprop(flat).state_dict()`` from any world size (each rank keeps its slice),
        or this rank's own :meth:`state_dict` from a run with the same world size. Everything is
        checked on every rank before anything is written; a problem on any rank raises on all
        (``RankError`` on the others) and changes nothing."""
        error = parts = loadable = None
        try:
            loadable, summary = checked_shard_form(
                state_dict, layout=self.flat.layout, dtypes=self._dtypes, bounds=self.shard,
                shard=self._shard_description(), current_lr=self.param_groups[0]["lr"],
                always_momentum=self._always_momentum, state_dtypes=self._state_dtypes,
                group_keys=checkpoint.group_keys(self))
            parts = {name: repr(value) for name, value in summary.items()}
        except Exception as exc:
            error = exc
        agree(self.comm, error, parts, "load_state_dict()")
        checkpoint.load_state_dict(self, loadable)

    def __repr__(self) -> str:
        shards = ", ".join(f"{d}: [{lo}, {hi}) of {n}"
                           for d, (lo, hi), n in zip(self._dtypes, self.shard, self._sizes))
        hyper = ", ".join(f"{k}={self.param_groups[0][k]!r}" for k in HYPERPARAMETERS)
        return (f"ShardedRMSprop(rank {self.rank} of {self.world_size}, shards {{{shards}}}, "
                f"{len(self._buckets)} buckets, average={self.average}, preset={self.preset!r}, "
                f"backend={self._engine.backend!r}, skip_nonfinite={self.skip_nonfinite},\n"
                f"  {hyper})")
