"""Objects holding large tensors between the calibrating processes, without pickling the tensors.

torch.distributed's *_object collectives pickle a whole object, tensors included (torch.save), and
unpickle it on arrival: at DiT-XL/2, sending every layer's float32 X^T X to its owner that way
doubled the statistics pass of two processes dividing the chunks. Here the object is pickled with its
large tensors left out (a persistent id giving shape, dtype and memory order); the pickle travels
first, then each large tensor as raw bytes, in the order the receiver's unpickler asks for them.

    obj        any picklable object (nested dicts, lists, dataclasses, ...) holding strided tensors.
               Every tensor arrives with its values, shape and dtype, as a plain tensor without
               autograd (a Parameter as a tensor); a dense one (contiguous up to a permutation of
               its dims) with its strides, any other (a slice with gaps, an expanded view)
               contiguous. A tensor met twice arrives as one.
    large      a tensor of at least INLINE_BYTES: travels raw, after the pickle.
    small      every other tensor: its bytes inside the pickle.
    device     where the receiver's tensors land (every one, small or large).
    wire       the process group's device: the current CUDA device under nccl, the CPU under gloo.
               Tensors are copied there to travel when they are elsewhere.

send(obj, dst) / recv(src, device): point to point, every rank may call them in any pairing.
broadcast(obj, src, device): a collective (every rank calls it, src with the object).
"""
import io
import pickle

import torch
import torch.distributed as dist

INLINE_BYTES = 1 << 16  # smaller tensors travel inside the pickle (one message instead of one each)


def wire_device():
    """The device the process group's tensors travel on."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _order(t):
    """t's dims from the outermost in memory to the innermost, or None when t is not dense in some order."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return order if t.permute(order).is_contiguous() else None


class _Pickler(pickle.Pickler):
    """Pickles obj with each tensor as a persistent id: the small ones' bytes inside, the large ones out of
    band (self.large, in pickling order)."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.large, self._seen, self._kept = [], {}, []

    def persistent_id(self, obj):
        if not isinstance(obj, torch.Tensor):
            return None
        if id(obj) in self._seen:  # the same tensor again: it travels once
            return ("again", self._seen[id(obj)])
        if obj.layout != torch.strided:
            raise TypeError(f"only strided tensors travel between ranks, not {obj.layout}")
        self._seen[id(obj)] = len(self._seen)
        self._kept.append(obj)  # alive until the pickle is done: no id reused
        order = _order(obj) or list(range(obj.dim()))
        flat = obj.detach().permute(order).contiguous()  # a view for a dense tensor: no copy
        kind = (tuple(flat.shape), obj.dtype, tuple(order))
        if flat.numel() * flat.element_size() >= INLINE_BYTES:
            self.large.append(flat)
            return ("large", *kind)
        return ("small", *kind, _bytes(flat.cpu()).numpy().tobytes())


class _Unpickler(pickle.Unpickler):
    """Unpickles with fetch(shape, dtype) giving each large tensor in turn (laid out as the sender's)."""

    def __init__(self, file, fetch, device):
        super().__init__(file)
        self.fetch, self.device, self.got = fetch, device, []

    def persistent_load(self, pid):
        if pid[0] == "again":
            return self.got[pid[1]]
        shape, dtype, order = pid[1:4]
        if pid[0] == "large":
            flat = self.fetch(shape, dtype)
        elif pid[4]:
            flat = torch.frombuffer(bytearray(pid[4]), dtype=torch.uint8).view(dtype).reshape(shape)
        else:
            flat = torch.empty(shape, dtype=dtype)
        inverse = sorted(range(len(order)), key=order.__getitem__)
        t = flat.to(self.device).permute(inverse)
        self.got.append(t)
        return t


def _pickled(obj):
    """(the pickle as a uint8 tensor, [its large tensors, contiguous, in pickling order])."""
    buf = io.BytesIO()
    p = _Pickler(buf)
    p.dump(obj)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), p.large


def _unpickled(data, fetch, device):
    return _Unpickler(io.BytesIO(data.numpy().tobytes()), fetch, device).load()


def _bytes(t):
    """t (contiguous) as a flat uint8 view."""
    return t.reshape(-1).view(torch.uint8)


def _put(obj, move):
    """obj out of this rank: its pickle's length, the pickle, its large tensors; move(t) sends t's bytes."""
    wire = wire_device()
    data, large = _pickled(obj)
    for t in (torch.tensor([data.numel()], dtype=torch.int64), data, *large):
        if t.numel():
            move(_bytes(t.to(wire)))


def _take(move, device):
    """The object _put sends, its tensors on `device`; move(t) fills t's bytes."""
    wire = wire_device()

    def fetch(shape, dtype):
        t = torch.empty(shape, dtype=dtype, device=wire)
        if t.numel():
            move(_bytes(t))
        return t
    n = fetch((1,), torch.int64)
    return _unpickled(fetch((int(n.item()),), torch.uint8).cpu(), fetch, device)


def send(obj, dst):
    """Send obj to rank dst (which calls recv(src=this rank))."""
    _put(obj, lambda t: dist.send(t, dst))


def recv(src, device):
    """The object rank src sends (send(obj, dst=this rank)), its tensors on `device`."""
    return _take(lambda t: dist.recv(t, src), device)


def broadcast(obj, src, device):
    """src's obj on every rank: obj itself on src, elsewhere a copy with its tensors on `device`."""
    def move(t):
        dist.broadcast(t, src)
    if dist.get_rank() == src:
        _put(obj, move)
        return obj
    return _take(move, device)
