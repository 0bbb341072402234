"""The Triton kernels behind wren/triton_ops.py, in a module of their own: imported at the first CUDA call
(or by the tests' interpreter runs), so that a CPU-only process never loads Triton."""

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, res_ptr, cos_ptr, sin_ptr, scale_ptr, out_ptr, heads, eps, offset, D: tl.constexpr,
                    HAS_W: tl.constexpr, HAS_RES: tl.constexpr, ROPE: tl.constexpr, HAS_SCALE: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    x = tl.load(x_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * r
    if HAS_W:
        y = y * (tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32) + offset)
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # the norm is rounded to x's dtype, as in PyTorch
    if ROPE:  # half-split RoPE: the partner of coordinate d is d +- D/2, normed the same way
        half: tl.constexpr = D // 2
        partner = tl.where(d < half, d + half, d - half)
        yp = tl.load(x_ptr + row * D + partner, mask=ok, other=0.0).to(tl.float32) * r
        if HAS_W:
            yp = yp * (tl.load(w_ptr + partner, mask=ok, other=0.0).to(tl.float32) + offset)
        yp = yp.to(out_ptr.dtype.element_ty).to(tl.float32)
        at = (row // heads) * D + d
        c = tl.load(cos_ptr + at, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + at, mask=ok, other=0.0).to(tl.float32)
        y = y * c + tl.where(d < half, -yp, yp) * s
    if HAS_RES:
        y = tl.load(res_ptr + row * D + d, mask=ok, other=0.0).to(tl.float32) + y
    if HAS_SCALE:  # (residual + norm) rounded, then times the scalar, as two PyTorch ops would
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32) * tl.load(scale_ptr).to(tl.float32)
    tl.store(out_ptr + row * D + d, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def seen_slots(kpos_ptr, valid_ptr, b, skp_b, sva_b, s, ok_s, qpos, window, HAS_WINDOW: tl.constexpr,
               HAS_VALID: tl.constexpr):
    """Which cache slots `s` of sequence b the query at `qpos` attends to: a known position (>= 0), not
    after the query's, within the window, and valid (not left padding)."""
    kpos = tl.load(kpos_ptr + b * skp_b + s, mask=ok_s, other=-1)
    seen = (kpos >= 0) & (kpos <= qpos)
    if HAS_WINDOW:
        seen = seen & (kpos > qpos - window)
    if HAS_VALID:
        seen = seen & (tl.load(valid_ptr + b * sva_b + s, mask=ok_s, other=0) != 0)
    return seen


@triton.jit
def online_softmax(scores, seen, m, total, softcap, SOFTCAP: tl.constexpr):
    """One block of slots of a running softmax: (soft-capped) scores of the unseen slots dropped, the
    probabilities against the new running max, the factor that rescales what came before, the new max
    and the new sum."""
    if SOFTCAP:
        scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))  # softcap * tanh(x / softcap)
    scores = tl.where(seen[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp() finite
    p = tl.exp(scores - base[:, None])
    alpha = tl.exp(m - base)
    return p, alpha, m_new, total * alpha + tl.sum(p, axis=1)


@triton.jit
def walsh_hadamard(x, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The Walsh-Hadamard transform in Sylvester order of each row of x [ROWS, BLOCK] (a power of two up to
    1024), unnormalised: butterflies on pairs (i, i + h) for h = 1, 2, 4, ..., each a reshape, split and
    join. (A tl.dot by the 128 x 128 matrix in float32 compiles to FMAs over spilled registers, ~2,000
    local-memory accesses a thread; this is a few hundred adds and shuffles.)"""
    for s in tl.static_range(10):
        if (2 << s) <= BLOCK:
            pairs = tl.permute(tl.reshape(x, (ROWS, BLOCK // (2 << s), 2, 1 << s)), (0, 1, 3, 2))
            a, b = tl.split(pairs)
            x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (ROWS, BLOCK))
    return x


@triton.jit
def rotated_rows(x, signs_ptr, ROWS: tl.constexpr, BLOCK: tl.constexpr, unit, INVERSE: tl.constexpr = False):
    """turboquant's seeded Hadamard rotation of each row of x [ROWS, BLOCK], one block a row: both rounds of
    signs (`signs_ptr`, [2, BLOCK]) and the Walsh-Hadamard transform times `unit` (1/sqrt(BLOCK)); with
    INVERSE, the rounds undone in reverse."""
    c = tl.arange(0, BLOCK)
    if INVERSE:
        x = walsh_hadamard(x, ROWS, BLOCK) * unit * tl.load(signs_ptr + BLOCK + c)[None, :]
        return walsh_hadamard(x, ROWS, BLOCK) * unit * tl.load(signs_ptr + c)[None, :]
    x = walsh_hadamard(x * tl.load(signs_ptr + c)[None, :], ROWS, BLOCK) * unit
    return walsh_hadamard(x * tl.load(signs_ptr + BLOCK + c)[None, :], ROWS, BLOCK) * unit


@triton.jit
def cache_slot(pos_ptr, WINDOW: tl.constexpr):
    """(the position of the token written, its slot: the position, or in a sliding layer's ring
    (WINDOW > 0) the position modulo the window)."""
    pos = tl.load(pos_ptr)
    return pos, (pos % WINDOW if WINDOW > 0 else pos)


@triton.jit
def rotated_into(out, heads, ok_g, b, xn_ptr, col_ptr, signs_ptr, unit, K: tl.constexpr, RDIM: tl.constexpr,
                 HAS_COL: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr):
    """Attention outputs `out` [BLOCK_G, D] (float32, already rounded to the model's dtype) of query heads
    `heads`, as a TurboQuant o projection reads its input: times the column scales, rotated in groups of
    RDIM (one Hadamard block: both rounds of signs and the Walsh-Hadamard transform, times `unit` =
    1/sqrt(RDIM) each), stored float32 into row b of xn in the order _tq_gemv_row reads (coordinate 8w + j
    at j * K/8 + w)."""
    d = tl.arange(0, D)
    k = heads[:, None] * D + d[None, :]  # the coordinate in the row of K = all heads' outputs
    if HAS_COL:
        out = out * tl.load(col_ptr + k, mask=ok_g[:, None], other=0.0)
    runs: tl.constexpr = BLOCK_G * D // RDIM  # (a head's output is whole groups)
    x = tl.reshape(out, (runs, RDIM))
    k = tl.reshape(k, (runs, RDIM))
    ok = tl.reshape(ok_g[:, None] & (d >= 0)[None, :], (runs, RDIM))
    y = rotated_rows(x, signs_ptr, runs, RDIM, unit)
    tl.store(xn_ptr + b * K + (k % 8) * (K // 8) + k // 8, y, mask=ok)


@triton.jit
def attend_one_kernel(q_ptr, k_ptr, v_ptr, kpos_ptr, valid_ptr, qpos_ptr, out_ptr, xn_ptr, col_ptr, signs_ptr,
                      unit, S, sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, skp_b, sva_b, sqp_b, window, scale,
                      softcap, G: tl.constexpr, D: tl.constexpr, HAS_VALID: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      SOFTCAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                      ROTATE: tl.constexpr, HAS_COL: tl.constexpr, RDIM: tl.constexpr, K_ROW: tl.constexpr):
    """The G query heads that share KV head h of sequence b, over the cache slots they see, in one pass
    (online softmax). With ROTATE the output also goes out as the TurboQuant o projection's rotated input
    (`rotated_into`), sparing the rotation its own launch."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    ok_g = g < G
    q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :], mask=ok_g[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    qpos = tl.load(qpos_ptr + b * sqp_b)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    s0 = 0
    while s0 < S:  # (a while loop: Triton's interpreter cannot range() to a run-time bound)
        s = s0 + tl.arange(0, BLOCK_S)
        s0 += BLOCK_S
        ok_s = s < S
        seen = seen_slots(kpos_ptr, valid_ptr, b, skp_b, sva_b, s, ok_s, qpos, window, HAS_WINDOW, HAS_VALID)
        k = tl.load(k_ptr + b * sk_b + h * sk_h + s[:, None] * sk_s + d[None, :], mask=ok_s[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(k)) * scale
        p, alpha, m_new, total = online_softmax(scores, seen, m, total, softcap, SOFTCAP)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + s[:, None] * sv_s + d[None, :], mask=ok_s[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]  # a query that sees nothing attends to nothing
    out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * (G * tl.num_programs(1) * D) + (h * G + g)[:, None] * D + d[None, :], out,
             mask=ok_g[:, None])
    if ROTATE:
        rotated_into(out.to(tl.float32), h * G + g, ok_g, b, xn_ptr, col_ptr, signs_ptr, unit, K_ROW, RDIM,
                     HAS_COL, BLOCK_G, D)


@triton.jit
def coded_vectors(codes_ptr, s, ok_s, d, table_ptr, NBYTES: tl.constexpr, K_HIGH: tl.constexpr,
                  HB: tl.constexpr, LB: tl.constexpr, LOW_BYTE0: tl.constexpr, HIGH_LEVELS: tl.constexpr):
    """Codebook values [BLOCK_S, D] of the vectors at rows `s` of a code buffer (NBYTES a row): each
    coordinate's bits found in the packed row (a fractional rate's two runs), looked up in the table."""
    high = d < K_HIGH
    bit = tl.where(high, d * HB, LOW_BYTE0 * 8 + (d - K_HIGH) * LB)
    byte = bit >> 3
    where = codes_ptr + s[:, None] * NBYTES + byte[None, :]
    b0 = tl.load(where, mask=ok_s[:, None], other=0).to(tl.int32)
    b1 = tl.load(where + 1, mask=ok_s[:, None] & (byte + 1 < NBYTES)[None, :], other=0).to(tl.int32)
    code = ((b0 | (b1 << 8)) >> (bit & 7)[None, :]) & tl.where(high, (1 << HB) - 1, (1 << LB) - 1)[None, :]
    return tl.load(table_ptr + tl.where(high[None, :], code, HIGH_LEVELS + code))


@triton.jit
def attend_codes_kernel(q_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr, ktab_ptr, vtab_ptr, kpos_ptr, valid_ptr, qpos_ptr,
                        out_ptr, kscale_ptr, ksigns_ptr, vsigns_ptr, unit, xn_ptr, col_ptr, osigns_ptr, ounit, S,
                        sq_b, sq_h, skp_b, sva_b, sqp_b, window, scale, softcap, H, G: tl.constexpr,
                        D: tl.constexpr, K_NBYTES: tl.constexpr,
                        K_HIGH: tl.constexpr, K_HB: tl.constexpr, K_LB: tl.constexpr, K_LOW0: tl.constexpr,
                        K_HL: tl.constexpr, V_NBYTES: tl.constexpr, V_HIGH: tl.constexpr, V_HB: tl.constexpr,
                        V_LB: tl.constexpr, V_LOW0: tl.constexpr, V_HL: tl.constexpr, HAS_VALID: tl.constexpr,
                        HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_KSCALE: tl.constexpr,
                        LOWP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, ROTATE: tl.constexpr,
                        HAS_COL: tl.constexpr, RDIM: tl.constexpr, K_ROW: tl.constexpr):
    """attend_one_kernel over a TurboQuant cache's codes. The queries enter the keys' frame here (divided by
    the key scales, both rounds of signs and Walsh-Hadamard transform, rounded to their dtype as
    kv.codecs.Frame.enter does), each cached vector's fp16 scale is applied to its score (keys) or its
    probability (values), and the output leaves the values' frame (the rounds undone in reverse) into
    [B, 1, H * D] in the queries' dtype. With LOWP (16-bit queries) the products run on the tensor cores in
    that dtype, the values rounded to it as `attend` rounds them; float32 queries take exact float32 dots
    (FMAs: kilobytes of stack a thread, but only a float32 model asks for them). ROTATE as in
    attend_one_kernel."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    hkv = tl.num_programs(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    ok_g = g < G
    q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :], mask=ok_g[:, None], other=0.0)
    q = q.to(tl.float32)
    if HAS_KSCALE:
        q = q / tl.load(kscale_ptr + d)[None, :]
    q = rotated_rows(q, ksigns_ptr, BLOCK_G, D, unit)
    q = q.to(out_ptr.dtype.element_ty).to(tl.float32)
    qpos = tl.load(qpos_ptr + b * sqp_b)
    rows = (b * hkv + h) * S  # this head's first vector in the [B, Hkv, S, ...] buffers
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    s0 = 0
    while s0 < S:
        s = s0 + tl.arange(0, BLOCK_S)
        s0 += BLOCK_S
        ok_s = s < S
        seen = seen_slots(kpos_ptr, valid_ptr, b, skp_b, sva_b, s, ok_s, qpos, window, HAS_WINDOW, HAS_VALID)
        k = coded_vectors(kc_ptr, rows + s, ok_s, d, ktab_ptr, K_NBYTES, K_HIGH, K_HB, K_LB, K_LOW0, K_HL)
        kscale = tl.load(ks_ptr + rows + s, mask=ok_s, other=0.0).to(tl.float32)
        if LOWP:  # the codebook values in the queries' 16-bit dtype, as `attend` reads them: tensor cores
            scores = tl.dot(q.to(out_ptr.dtype.element_ty), tl.trans(k.to(out_ptr.dtype.element_ty)))
        else:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        scores = scores * kscale[None, :] * scale
        p, alpha, m_new, total = online_softmax(scores, seen, m, total, softcap, SOFTCAP)
        v = coded_vectors(vc_ptr, rows + s, ok_s, d, vtab_ptr, V_NBYTES, V_HIGH, V_HB, V_LB, V_LOW0, V_HL)
        vscale = tl.load(vs_ptr + rows + s, mask=ok_s, other=0.0).to(tl.float32)
        if LOWP:
            weighed = tl.dot((p * vscale[None, :]).to(out_ptr.dtype.element_ty), v.to(out_ptr.dtype.element_ty))
        else:
            weighed = tl.dot(p * vscale[None, :], v, input_precision="ieee")
        acc = acc * alpha[:, None] + weighed
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    out = rotated_rows(out, vsigns_ptr, BLOCK_G, D, unit, INVERSE=True)
    out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (b * H + h * G + g)[:, None] * D + d[None, :], out, mask=ok_g[:, None])
    if ROTATE:
        rotated_into(out.to(tl.float32), h * G + g, ok_g, b, xn_ptr, col_ptr, osigns_ptr, ounit, K_ROW, RDIM,
                     HAS_COL, BLOCK_G, D)


@triton.jit
def gelu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """gelu_tanh(gate) * up, elementwise, in float32."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(gate_ptr + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + i, mask=ok, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) (g + 0.044715 g^3)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    tl.store(out_ptr + i, (0.5 * g * (1.0 + tanh) * u).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def kv_write_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, slot_pos_ptr, pos_ptr, heads, slots, k_sb, k_sh, v_sb, v_sh,
                    WINDOW: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One new token's key and value head vectors (program b * heads + h) into a cache's slot for them:
    the position, or in a sliding layer's ring (WINDOW > 0) the position modulo the window; the slot's
    position recorded (by the first program)."""
    row = tl.program_id(0)
    b = row // heads
    h = row % heads
    pos, slot = cache_slot(pos_ptr, WINDOW)
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    at = ((b * heads + h) * slots + slot) * D + d
    tl.store(keys_ptr + at, tl.load(k_ptr + b * k_sb + h * k_sh + d, mask=ok), mask=ok)
    tl.store(values_ptr + at, tl.load(v_ptr + b * v_sb + h * v_sh + d, mask=ok), mask=ok)
    if row == 0:
        tl.store(slot_pos_ptr + slot, pos)


@triton.jit
def qkv_norms_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr, keys_ptr,
                     values_ptr, slot_pos_ptr, pos_ptr, slots, hq, hkv, q_row, k_row, v_row, eps, offset,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, WRITE: tl.constexpr, WINDOW: tl.constexpr):
    """Gemma 4's three head norms in one launch, program (token, head) over the q, k and v heads in turn:
    q and k by their weights then RoPE'd (as rms_norm_kernel with ROPE), v weightless. Inputs are head
    vectors at a row stride a token (the views of one GEMV output); outputs contiguous [tokens, heads, D].
    With WRITE (one token a sequence) the k and v heads also go into the cache's slot for them, as
    kv_write_kernel would put them, and the slot's position is recorded."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    is_q = h < hq
    is_v = h >= hq + hkv
    head = tl.where(is_q, h, tl.where(is_v, h - hq - hkv, h - hq))
    src = tl.where(is_q, q_ptr + t * q_row, tl.where(is_v, v_ptr + t * v_row, k_ptr + t * k_row)) + head * D
    dst = tl.where(is_q, qo_ptr + t * hq * D, tl.where(is_v, vo_ptr + t * hkv * D, ko_ptr + t * hkv * D)) + head * D
    w_ptr = tl.where(is_q, qw_ptr, kw_ptr)
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    half: tl.constexpr = D // 2
    partner = tl.where(d < half, d + half, d - half)
    x = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.where(is_v, 1.0, tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32) + offset)
    wp = tl.where(is_v, 1.0, tl.load(w_ptr + partner, mask=ok, other=0.0).to(tl.float32) + offset)
    y = (x * r * w).to(qo_ptr.dtype.element_ty).to(tl.float32)  # rounded to the dtype, as in PyTorch
    yp = (tl.load(src + partner, mask=ok, other=0.0).to(tl.float32) * r * wp).to(qo_ptr.dtype.element_ty)
    c = tl.load(cos_ptr + t * D + d, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * D + d, mask=ok, other=0.0).to(tl.float32)
    roped = y * c + tl.where(d < half, -yp.to(tl.float32), yp.to(tl.float32)) * s
    out = tl.where(is_v, y, roped).to(qo_ptr.dtype.element_ty)
    tl.store(dst + d, out, mask=ok)
    if WRITE:  # (t is the sequence: one token each)
        pos, slot = cache_slot(pos_ptr, WINDOW)
        cache = tl.where(is_v, values_ptr, keys_ptr) + ((t * hkv + head) * slots + slot) * D
        tl.store(cache + d, out, mask=ok & (h >= hq))
        tl.store(slot_pos_ptr + slot, pos, mask=(h == hq) & (t == 0))


@triton.jit
def rope_tables_kernel(pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """cos and sin of position * inverse frequency for one token (program), the half-split layout's
    [D] = [freqs, freqs], computed in float32 as layers.rope_cos_sin does and rounded to the tables' dtype."""
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    ok = d < 2 * HALF
    inv_freq = tl.load(inv_freq_ptr + d % HALF, mask=ok, other=0.0).to(tl.float32)
    angle = tl.load(pos_ptr + row).to(tl.float32) * inv_freq
    tl.store(cos_ptr + row * 2 * HALF + d, tl.cos(angle).to(cos_ptr.dtype.element_ty), mask=ok)
    tl.store(sin_ptr + row * 2 * HALF + d, tl.sin(angle).to(sin_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _encode_vector(src_ptr, kscale_ptr, signs_ptr, table_ptr, mids_ptr, codes_ptr, scales_ptr, at, unit,
                   D: tl.constexpr, HAS_KSCALE: tl.constexpr, NBYTES: tl.constexpr, K_HIGH: tl.constexpr,
                   HB: tl.constexpr, LB: tl.constexpr, LOW_BYTE0: tl.constexpr, HIGH_LEVELS: tl.constexpr,
                   LOW_MID0: tl.constexpr, MIDS: tl.constexpr):
    """kv.codecs.TQ.encode of one head vector into row `at` of a cache's codes and scales: rotated (both
    rounds of signs and the Walsh-Hadamard transform over the whole vector), each coordinate of the unit
    vector given the code of its nearest centroid (its run's midpoints below it counted), the least-squares
    fp16 scale, and the codes packed a group of 8 (a whole number of bytes in either run) at a time."""
    d = tl.arange(0, D)
    x = tl.load(src_ptr + d).to(tl.float32)
    if HAS_KSCALE:  # keys are coded scaled per channel (kv/scales.py)
        x = x * tl.load(kscale_ptr + d)
    xr = tl.reshape(rotated_rows(tl.reshape(x, (1, D)), signs_ptr, 1, D, unit), (D,))
    norm = tl.sqrt(tl.sum(xr * xr, axis=0))
    u = xr / tl.where(norm > 0, norm, 1.0)
    high = d < K_HIGH
    levels = tl.where(high, (1 << HB) - 1, (1 << LB) - 1)  # midpoints of the coordinate's run
    first = tl.where(high, 0, LOW_MID0)
    code = tl.zeros((D,), dtype=tl.int32)
    for j in tl.static_range(MIDS):
        mid = tl.load(mids_ptr + first + j, mask=j < levels, other=float("inf"))
        code += (mid < u).to(tl.int32)
    c = tl.load(table_ptr + tl.where(high, code, HIGH_LEVELS + code))
    scale = tl.sum(xr * c, axis=0) / tl.maximum(tl.sum(c * c, axis=0), 1e-12)
    tl.store(scales_ptr + at, tl.minimum(tl.maximum(scale, -65504.0), 65504.0).to(scales_ptr.dtype.element_ty))
    groups = tl.arange(0, D // 8)
    bits = tl.where(groups * 8 < K_HIGH, HB, LB)  # a group of 8 codes lies in one run: `bits` bytes of codes
    shifts = (bits[:, None] * tl.arange(0, 8)[None, :]).to(tl.int64)
    word = tl.sum(tl.reshape(code, (D // 8, 8)).to(tl.int64) << shifts, axis=1)
    byte0 = tl.where(groups * 8 < K_HIGH, groups * HB, LOW_BYTE0 + (groups - K_HIGH // 8) * LB)
    for k in tl.static_range(8):
        tl.store(codes_ptr + at * NBYTES + byte0 + k, ((word >> (8 * k)) & 255).to(tl.uint8), mask=k < bits)


@triton.jit
def kv_encode_kernel(k_ptr, v_ptr, kscale_ptr, ksigns_ptr, vsigns_ptr, ktab_ptr, kmids_ptr, vtab_ptr, vmids_ptr,
                     kcodes_ptr, kscales_ptr, vcodes_ptr, vscales_ptr, slot_pos_ptr, pos_ptr, heads, slots, k_sb,
                     k_sh, v_sb, v_sh, unit, D: tl.constexpr, WINDOW: tl.constexpr, HAS_KSCALE: tl.constexpr,
                     K_NBYTES: tl.constexpr, K_HIGH: tl.constexpr, K_HB: tl.constexpr, K_LB: tl.constexpr,
                     K_LOW0: tl.constexpr, K_HL: tl.constexpr, V_NBYTES: tl.constexpr, V_HIGH: tl.constexpr,
                     V_HB: tl.constexpr, V_LB: tl.constexpr, V_LOW0: tl.constexpr, V_HL: tl.constexpr,
                     K_LM: tl.constexpr, V_LM: tl.constexpr, MIDS: tl.constexpr):
    """One new token's key (program (b * heads + h, 0)) or value (.., 1) head vector coded into a TurboQuant
    cache's slot for it (the position, or in a sliding layer's ring the position modulo the window), as the
    codecs code them; the slot's position recorded (by the first program)."""
    row = tl.program_id(0)
    b = row // heads
    h = row % heads
    pos, slot = cache_slot(pos_ptr, WINDOW)
    at = (b * heads + h) * slots + slot
    if tl.program_id(1) == 0:
        _encode_vector(k_ptr + b * k_sb + h * k_sh, kscale_ptr, ksigns_ptr, ktab_ptr, kmids_ptr, kcodes_ptr,
                       kscales_ptr, at, unit, D, HAS_KSCALE, K_NBYTES, K_HIGH, K_HB, K_LB, K_LOW0, K_HL, K_LM, MIDS)
        tl.store(slot_pos_ptr + slot, pos, mask=row == 0)
    else:
        _encode_vector(v_ptr + b * v_sb + h * v_sh, kscale_ptr, vsigns_ptr, vtab_ptr, vmids_ptr, vcodes_ptr,
                       vscales_ptr, at, unit, D, False, V_NBYTES, V_HIGH, V_HB, V_LB, V_LOW0, V_HL, V_LM, MIDS)
