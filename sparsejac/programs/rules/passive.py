"""Operations whose results carry no derivative, and those that leave torch."""

from ..registry import passive

# Queries that read no values on a traced tensor.
passive("metadata", (
    "shape", "size", "dim", "ndim", "ndimension", "numel", "dtype", "device", "is_floating_point",
    "is_complex", "is_contiguous", "stride", "__len__", "layout", "requires_grad", "is_leaf",
    "__format__", "__repr__", "__hash__", "element_size", "nelement", "storage_offset",
    "data_ptr", "untyped_storage", "is_sparse", "is_cuda", "names", "is_nested", "is_meta",
    "is_quantized", "is_mkldnn", "is_xpu", "is_mps", "get_device", "is_inference", "grad_fn",
    "grad", "_version", "is_conj", "is_neg", "__dir__", "is_signed", "has_names",
    "_is_view", "is_mps", "is_sparse_csr", "dim_order", "__torch_function__",
    "is_same_size", "itemsize", "nbytes", "_has_symbolic_sizes_strides", "output_nr",
))
# Piecewise constant in the values (zero derivative almost everywhere, as torch has it):
# comparisons, signs, argmax; detach; tensors made like a traced one (shape and dtype only).
passive("constant", (
    "gt", "lt", "ge", "le", "eq", "ne", "__gt__", "__lt__", "__ge__", "__le__", "__eq__",
    "__ne__", "greater", "less", "greater_equal", "less_equal", "equal", "sign", "argmax",
    "argmin", "isnan", "isinf", "isfinite", "detach", "__bool__", "allclose", "isclose",
    "logical_not", "round", "floor", "ceil", "trunc", "argsort", "__and__", "__or__",
    "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor",
    "heaviside", "signbit", "sgn", "frac_constant", "bernoulli_constant", "data",
))
passive("python", ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__array__"))
