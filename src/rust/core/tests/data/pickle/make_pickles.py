"""Regenerate the pickle test files read by src/rust/core/src/pickle/tests.rs.

Run with any Python 3.8+ that has numpy (written with numpy 2.4.6, Python 3.11):
    python3 make_pickles.py            # in this folder
The content is deterministic; the Rust tests hard-code the same values.
"""
import collections
import pickle

import numpy as np


class Opaque:
    """Stands in for an sklearn estimator: NEWOBJ + BUILD with its __dict__."""

    def __init__(self):
        self.coef_ = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3) / 4)
        self.classes_ = np.array(["B cell", "T cell"], dtype=object)
        self.n_features_in_ = 3
        self.name = "opaque"


def basic():
    shared = [1, 2, 3]
    many = [f"s{i}" for i in range(300)]  # > 256 memo entries: LONG_BINPUT / LONG_BINGET
    return {
        "none": None,
        "t": True,
        "f": False,
        "ints": [0, 1, -1, 255, 256, 65535, 65536, -70000, 2**31 - 1, -(2**31), 2**40,
                 -(2**63), 2**63 - 1],
        "big": 2**70,
        "negbig": -(2**70) - 5,
        "floats": [0.0, -1.5, 1e-300, float("inf")],
        "str": "héllo ☃",
        "long_str": "x" * 300,
        "bytes": b"\x00\x01\xff",
        "empty_bytes": b"",
        "bytearray": bytearray(b"abc"),
        "tuple": (1, "a", (2.5, None)),
        "empty_tuple": (),
        "set": {7},
        "frozenset": frozenset([8]),
        "shared": [shared, shared],
        "many": many + many,
        "odict": collections.OrderedDict([("b", 1), ("a", 2)]),
        "ddict": collections.defaultdict(list, {"k": [1]}),
        "nested": {"a": {"b": {"c": [1, [2, [3]]]}}},
    }


def arrays():
    return {
        "f8": np.arange(6, dtype=np.float64).reshape(2, 3) / 8,
        "f4F": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(3, 2)),
        "i4": np.array([-1, 0, 7], dtype=np.int32),
        "i8": np.array([2**40, -3], dtype=np.int64),
        "u1": np.array([0, 255], dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "U": np.array(["ab", "ü", ""]),
        "obj": np.array(["gene1", "gene2"], dtype=object),
        "be": np.array([1.5, -2.0], dtype=">f8"),
        "f2": np.array([1.0, -2.0], dtype=np.float16),
        "sc_f8": np.float64(2.5),
        "sc_i8": np.int64(-7),
        "sc_f4": np.float32(0.25),
        "empty": np.zeros((0, 3)),
        "zero_d": np.array(3.0),
        "i8F3": np.asfortranarray(np.arange(24, dtype=np.int64).reshape(2, 3, 4)),
        "opaque": Opaque(),
    }


def main():
    for p in (2, 3, 4, 5):
        with open(f"basic_p{p}.pkl", "wb") as f:
            pickle.dump(basic(), f, protocol=p)
    for p in (2, 4, 5):
        with open(f"numpy_p{p}.pkl", "wb") as f:
            pickle.dump(arrays(), f, protocol=p)
    # numpy 1.x writers name the module numpy.core (protocol 2 writes GLOBAL as text lines,
    # so the rename keeps the pickle valid)
    data = pickle.dumps(arrays(), protocol=2).replace(b"numpy._core", b"numpy.core")
    with open("numpy_p2_core.pkl", "wb") as f:
        f.write(data)


if __name__ == "__main__":
    main()
