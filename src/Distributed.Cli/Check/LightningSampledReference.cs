using static Distributed.Cli.Check.VectorMath;

namespace Distributed.Cli.Check;

/// <summary>
/// An independent fp64 reference for lightning (linear) attention at sampled rows only, computed straight from the
/// inputs with exact fp64 prefix/suffix states (no kernel of the project). Causal, with per-query-head decay λ_h
/// and global positions: <c>o_i = Σ_{j≤i} λ_h^(i−j) (q_i·k_j) v_j</c>. Non-causal (decay ignored): <c>O = Q (KᵀV)</c>.
/// Cost: one pass over the tokens (O(N·H·D·Dv) time), O(block + rows + H·D·Dv) memory.
/// </summary>
internal static class LightningSampledReference
{
    /// <summary>Tokens read per block of a streamed tensor.</summary>
    public const int DefaultBlockTokens = 512;

    /// <summary>
    /// Exact O_i <c>[H·Dv]</c> and, with <paramref name="dO"/>, dQ_i <c>[H·D]</c> of the sampled query rows.
    /// Causal: prefix states per query head <c>S_i = Σ_{j≤i} λ^(i−j) k_jᵀ v_j</c> (D×Dv), built in one forward pass
    /// over tokens 0..(last sampled row) per batch; <c>o_i = q_i S_i</c>, <c>dQ_i[d] = Σ_e S_i[d,e] dO_i[e]</c>.
    /// Non-causal: one state per KV head over all tokens, <c>S = KᵀV</c>, the same for every row.
    /// </summary>
    /// <param name="decay">λ_h per query head, in (0, 1]; empty means 1 for every head. Ignored when not causal.</param>
    public static QueryRowResults QueryRows(ITokenRows q, ITokenRows k, ITokenRows v, ITokenRows? dO, SampledDims dims,
        ReadOnlySpan<float> decay, bool causal, IReadOnlyList<TokenRow> rows, int blockTokens = DefaultBlockTokens)
    {
        dims.ExpectInputs(q, k, v, dO, blockTokens);
        int H = dims.Heads, Hk = dims.KvHeads, D = dims.HeadDim, Dv = dims.ValueDim, group = dims.Group;
        double[] lambda = Lambdas(decay, H, causal);
        bool grad = dO is not null;

        int R = rows.Count;
        var o = new double[(long)R * H * Dv];
        var dq = grad ? new double[(long)R * H * D] : null;

        foreach (var (b, order) in TokenRow.GroupByBatch(rows, dims))
        {
            int n = order.Length;
            long[] tokens = order.Select(r => rows[r].Token).ToArray();
            var qs = TokenRowsAccess.ReadRows(q, b, tokens);
            var dos = grad ? TokenRowsAccess.ReadRows(dO!, b, tokens) : null;

            // Causal: one state per query head (its own λ). Non-causal: one per KV head, shared by its group.
            int states = causal ? H : Hk;
            var state = new double[states][];
            for (int s = 0; s < states; s++) state[s] = new double[D * Dv];

            // Writes row r's outputs for query head h from state s.
            void Extract(int r, int h, double[] s)
            {
                var oh = o.AsSpan((order[r] * H + h) * Dv, Dv);
                var qh = qs.AsSpan((r * H + h) * D, D);
                for (int d = 0; d < D; d++) Axpy(qh[d], s.AsSpan(d * Dv, Dv), oh);
                if (!grad) return;
                var doh = dos.AsSpan((r * H + h) * Dv, Dv);
                var dqh = dq.AsSpan((order[r] * H + h) * D, D);
                for (int d = 0; d < D; d++) dqh[d] = Dot(s.AsSpan(d * Dv, Dv), doh);
            }

            long end = causal ? tokens[^1] + 1 : dims.SeqLen;
            var kf = new float[blockTokens * Hk * D];
            var vf = new float[blockTokens * Hk * Dv];
            var kd = new double[blockTokens * Hk * D];
            var vd = new double[blockTokens * Hk * Dv];
            int rowLo = 0;
            for (long start = 0; start < end; start += blockTokens)
            {
                int cnt = (int)Math.Min(blockTokens, end - start);
                k.Read(b, start, cnt, kf);
                v.Read(b, start, cnt, vf);
                Widen(kf.AsSpan(0, cnt * Hk * D), kd);
                Widen(vf.AsSpan(0, cnt * Hk * Dv), vd);
                long blockStart = start;
                int firstRow = rowLo;
                Parallel.For(0, states, s =>
                {
                    int g = causal ? s / group : s;
                    double lam = lambda[causal ? s : 0];
                    var st = state[s];
                    int p = firstRow;
                    for (int t = 0; t < cnt; t++)
                    {
                        // S_t = λ S_(t−1) + k_tᵀ v_t.
                        DecayedOuterUpdate(st, lam, kd.AsSpan((t * Hk + g) * D, D), vd.AsSpan((t * Hk + g) * Dv, Dv));
                        if (!causal) continue;
                        for (; p < n && tokens[p] == blockStart + t; p++) Extract(p, s, st);
                    }
                });
                while (rowLo < n && tokens[rowLo] < start + cnt) rowLo++;
            }
            if (!causal)
                Parallel.For(0, n, r =>
                {
                    for (int h = 0; h < H; h++) Extract(r, h, state[h / group]);
                });
        }
        return new QueryRowResults(rows, H, D, Dv, o, null, null, dq);
    }

    /// <summary>
    /// Exact dK_j <c>[Hk·D]</c> and dV_j <c>[Hk·Dv]</c> of the sampled key rows, with suffix states per query head
    /// <c>G_j = Σ_{i≥j} λ^(i−j) q_iᵀ dO_i</c> (D×Dv) built in one reverse pass from N−1 down to the first sampled row:
    /// <c>dK_j[d] = Σ_{h∈group} Σ_e G^h_j[d,e] v_j[e]</c>, <c>dV_j[e] = Σ_{h∈group} Σ_d k_j[d] G^h_j[d,e]</c>.
    /// Non-causal: <c>G = Σ_{h∈group} Σ_i q_iᵀ dO_i</c> over all tokens.
    /// </summary>
    /// <param name="decay">λ_h per query head, in (0, 1]; empty means 1 for every head. Ignored when not causal.</param>
    public static KeyRowResults KeyRows(ITokenRows q, ITokenRows k, ITokenRows v, ITokenRows dO, SampledDims dims,
        ReadOnlySpan<float> decay, bool causal, IReadOnlyList<TokenRow> rows, int blockTokens = DefaultBlockTokens)
    {
        dims.ExpectInputs(q, k, v, dO, blockTokens);
        int H = dims.Heads, Hk = dims.KvHeads, D = dims.HeadDim, Dv = dims.ValueDim, group = dims.Group;
        double[] lambda = Lambdas(decay, H, causal);

        int R = rows.Count;
        var dk = new double[(long)R * Hk * D];
        var dv = new double[(long)R * Hk * Dv];

        foreach (var (b, order) in TokenRow.GroupByBatch(rows, dims))
        {
            int n = order.Length;
            long[] tokens = order.Select(r => rows[r].Token).ToArray();
            var ks = TokenRowsAccess.ReadRows(k, b, tokens);
            var vs = TokenRowsAccess.ReadRows(v, b, tokens);
            // Per-state contributions [n, states, D|Dv], summed over each KV head's query heads at the end in a
            // fixed order, so the parallel pass stays deterministic.
            int states = causal ? H : Hk;
            var state = new double[states][];
            for (int s = 0; s < states; s++) state[s] = new double[D * Dv];
            var dkPart = new double[(long)n * states * D];
            var dvPart = new double[(long)n * states * Dv];

            void Extract(int r, int s, double[] st)
            {
                int g = causal ? s / group : s;
                var kj = ks.AsSpan((r * Hk + g) * D, D);
                var vj = vs.AsSpan((r * Hk + g) * Dv, Dv);
                var dkp = dkPart.AsSpan((r * states + s) * D, D);
                var dvp = dvPart.AsSpan((r * states + s) * Dv, Dv);
                for (int d = 0; d < D; d++)
                {
                    var gd = st.AsSpan(d * Dv, Dv);
                    dkp[d] = Dot(gd, vj);
                    Axpy(kj[d], gd, dvp);
                }
            }

            long stop = causal ? tokens[0] : 0;
            var qf = new float[blockTokens * H * D];
            var of = new float[blockTokens * H * Dv];
            var qd = new double[blockTokens * H * D];
            var od = new double[blockTokens * H * Dv];
            int rowHi = n - 1;
            for (long end = dims.SeqLen; end > stop; end -= blockTokens)
            {
                long start = Math.Max(stop, end - blockTokens);
                int cnt = (int)(end - start);
                q.Read(b, start, cnt, qf);
                dO.Read(b, start, cnt, of);
                Widen(qf.AsSpan(0, cnt * H * D), qd);
                Widen(of.AsSpan(0, cnt * H * Dv), od);
                long blockStart = start;
                int lastRow = rowHi;
                Parallel.For(0, states, s =>
                {
                    var st = state[s];
                    int p = lastRow;
                    for (int t = cnt - 1; t >= 0; t--)
                    {
                        if (causal)
                        {
                            // G_t = λ G_(t+1) + q_tᵀ dO_t.
                            DecayedOuterUpdate(st, lambda[s], qd.AsSpan((t * H + s) * D, D), od.AsSpan((t * H + s) * Dv, Dv));
                            for (; p >= 0 && tokens[p] == blockStart + t; p--) Extract(p, s, st);
                        }
                        else
                            for (int h = s * group; h < (s + 1) * group; h++)
                                DecayedOuterUpdate(st, 1.0, qd.AsSpan((t * H + h) * D, D), od.AsSpan((t * H + h) * Dv, Dv));
                    }
                });
                while (rowHi >= 0 && tokens[rowHi] >= start) rowHi--;
            }
            if (!causal)
                Parallel.For(0, n, r =>
                {
                    for (int g = 0; g < Hk; g++) Extract(r, g, state[g]);
                });

            int per = causal ? group : 1;
            for (int r = 0; r < n; r++)
                for (int g = 0; g < Hk; g++)
                {
                    var dkj = dk.AsSpan((order[r] * Hk + g) * D, D);
                    var dvj = dv.AsSpan((order[r] * Hk + g) * Dv, Dv);
                    for (int s = g * per; s < (g + 1) * per; s++)
                    {
                        Axpy(1.0, dkPart.AsSpan((r * states + s) * D, D), dkj);
                        Axpy(1.0, dvPart.AsSpan((r * states + s) * Dv, Dv), dvj);
                    }
                }
        }
        return new KeyRowResults(rows, Hk, D, Dv, dk, dv);
    }

    /// <summary>λ per query head as fp64 (all 1 when not causal or when <paramref name="decay"/> is empty).</summary>
    private static double[] Lambdas(ReadOnlySpan<float> decay, int heads, bool causal)
    {
        var lambda = new double[heads];
        Array.Fill(lambda, 1.0);
        if (!causal || decay.IsEmpty) return lambda;
        if (decay.Length != heads) throw new ArgumentException($"decay has {decay.Length} entries; expected one per query head ({heads}).", nameof(decay));
        for (int h = 0; h < heads; h++)
        {
            if (!(decay[h] > 0f && decay[h] <= 1f)) throw new ArgumentOutOfRangeException(nameof(decay), $"λ_{h} = {decay[h]} is outside (0, 1].");
            lambda[h] = decay[h];
        }
        return lambda;
    }
}
