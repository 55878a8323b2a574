namespace Distributed.Cli.Simulate;

/// <summary>The model shape: Q <c>[B,N,H,D]</c>, K <c>[B,N,Hk,D]</c>, V <c>[B,N,Hk,Dv]</c>, times <c>Layers</c>.</summary>
internal sealed record SimulatedShape(int Batch, long SeqLen, int Heads, int KvHeads, int HeadDim, int ValueDim, int Layers, bool Causal, bool Decay)
{
    /// <summary>Linear-Llama3-1B-like: 16 layers, 32 heads of 64, 8 KV heads (GQA), batch 1, causal with decay.</summary>
    public static SimulatedShape LinearLlama3_1B(long seqLen) => new(1, seqLen, 32, 8, 64, 64, 16, true, true);
}

/// <summary>Achieved kernel throughputs, FLOP/s, and where they came from.</summary>
internal sealed record KernelRates(double FlashForward, double FlashBackward, double LightningForward, double LightningBackward, string Source)
{
    /// <summary>The preset's TFLOP/s for both directions.</summary>
    public static KernelRates FromPreset(ClusterPreset p) => new(p.FlashTflops * 1e12, p.FlashTflops * 1e12, p.LightningTflops * 1e12, p.LightningTflops * 1e12, $"preset: flash {p.FlashTflops} TFLOP/s, lightning {p.LightningTflops} TFLOP/s");
}

/// <summary>One scheme's projected forward+backward of one layer on one rank (the busiest).</summary>
/// <param name="Scheme">Named as the CLI names it.</param>
/// <param name="Attention">softmax or lightning.</param>
/// <param name="ComputeMs">Kernel time.</param>
/// <param name="CommMs">Communication time, whether hidden or not.</param>
/// <param name="TotalMs">The layer's time: compute plus the communication that is not overlapped.</param>
/// <param name="BytesSent">Bytes this rank hands to collectives (as the communicators count them).</param>
/// <param name="BytesReceived">Bytes this rank gets back.</param>
/// <param name="Feasible">False when the scheme cannot split this shape (the note says why); the times are then 0.</param>
/// <param name="Note">How it was modelled.</param>
internal sealed record SchemeEstimate(string Scheme, string Attention, double ComputeMs, double CommMs, double TotalMs, double BytesSent, double BytesReceived, bool Feasible, string Note);

/// <summary>
/// Per-scheme cost of one layer's forward and backward on P ranks, from <see cref="CollectiveCost"/> and the
/// kernel rates. FLOPs are those of <c>bench kernels</c>: softmax forward <c>2·B·H·N²·(D+Dv)</c> (half causal),
/// backward 2.5×; lightning forward <c>2·B·H·n·(64·(D+Dv)/2 + 2·D·Dv)</c> causal (<c>4·B·H·n·D·Dv</c>
/// non-causal) for n local tokens, backward 2×, plus the chunk states <c>2·B·H·n·D·Dv</c> each way.
/// Work is taken as balanced over ranks (zigzag for causal). Communication does not overlap compute except in
/// ring (each step's transfer hides behind that step's kernels), as implemented in this project.
/// </summary>
internal sealed class SchemeCostModel(ClusterPreset hardware, KernelRates rates, SimulatedShape shape, int ranks)
{
    /// <summary>Every scheme of the CLI, in the order printed.</summary>
    public static readonly string[] Schemes = ["lasp2", "lasp1", "ring", "allgather", "ulysses", "hybrid", "partial"];

    /// <summary>
    /// Rows added for lightning, to set against the LASP-2 paper: LASP-1 as the LASP paper's Algorithm 2 runs it
    /// (<see cref="Lasp1Paper"/>), LASP-2 with its all-gather hidden behind the intra-chunk compute as the paper
    /// runs it (<see cref="Lasp2Overlapped"/>), and a ring that keeps the right-product trick (linear compute).
    /// </summary>
    public static readonly string[] PaperRows = ["lasp1-paper", "lasp2-paper", "ring-linear"];

    private double B => shape.Batch;
    private double N => shape.SeqLen;
    private double H => shape.Heads;
    private double D => shape.HeadDim;
    private double Dv => shape.ValueDim;
    private double E => hardware.ElementBytes;
    private double LocalTokens => N / ranks;

    /// <summary>
    /// The estimate for <paramref name="scheme"/>. Lightning runs lasp2, lasp1, ulysses and hybrid; softmax
    /// runs allgather, partial, ring, ulysses and hybrid. With <paramref name="attention"/> = lightning, "ring"
    /// is the LASP papers' ring baseline: linear attention computed blockwise as QKᵀ then ·V (no right-product
    /// trick, so quadratic in N) with K, V blocks going round the ring; allgather and partial are softmax.
    /// </summary>
    public SchemeEstimate Estimate(string scheme, string attention)
    {
        bool lightning = attention == "lightning";
        return scheme switch
        {
            "lasp2" => Lasp2(),
            "lasp1" => Lasp1(),
            "lasp1-paper" => Lasp1Paper(),
            "lasp2-paper" => Lasp2Overlapped(),
            "ring-linear" => RingLinear(),
            "ring" => Ring(quadraticLinear: lightning),
            "allgather" => AllGather(),
            "ulysses" => Ulysses(lightning),
            "hybrid" => Hybrid(lightning),
            "partial" => Partial(),
            _ => throw new ArgumentException($"Unknown scheme '{scheme}'; use one of {string.Join(", ", Schemes)}.", nameof(scheme)),
        };
    }

    /// <summary>Lightning forward FLOPs over <paramref name="tokens"/> tokens and <paramref name="heads"/> heads.</summary>
    private double LightningForwardFlops(double tokens, double heads) =>
        shape.Causal ? 2 * B * heads * tokens * (64 * (D + Dv) / 2 + 2 * D * Dv) : 4 * B * heads * tokens * D * Dv;

    /// <summary>Seconds of one rank's lightning forward+backward plus its chunk states (per-rank work is N/P tokens × H).</summary>
    public double LightningSeconds()
    {
        double f = LightningForwardFlops(LocalTokens, H), state = 2 * B * H * LocalTokens * D * Dv;
        return (f + state) / rates.LightningForward + (2 * f + state) / rates.LightningBackward;
    }

    /// <summary>Seconds of one rank's share (1/P) of softmax-style quadratic attention, forward and backward.</summary>
    public (double Forward, double Backward) QuadraticSeconds(double backwardFactor)
    {
        double f = 2 * B * H * N * N * (D + Dv) * (shape.Causal ? 0.5 : 1) / ranks;
        return (f / rates.FlashForward, backwardFactor * f / rates.FlashBackward);
    }

    private double StateBytes(double heads) => B * heads * D * Dv * E;

    private SchemeEstimate Lasp2()
    {
        var c = new CollectiveCost(hardware, ranks);
        int chunks = shape.Causal ? 2 : 1; // zigzag for causal: two chunk states per rank
        double block = chunks * StateBytes(H);
        double comm = 2 * c.AllGather(block);
        double compute = LightningSeconds();
        return Make("lasp2", "lightning", compute, comm, compute + comm, 2 * block, 2 * ranks * block,
            $"one all-gather of {chunks} state(s) per pass, not overlapped (as --no-overlap; lasp2-paper is the overlapped run)");
    }

    private SchemeEstimate Lasp1()
    {
        var c = new CollectiveCost(hardware, ranks);
        int chains = shape.Causal ? 1 : 2;
        double state = StateBytes(H);
        double comm = 2 * chains * c.SerialChain(state);
        double compute = LightningSeconds();
        double perRank = ranks > 1 ? 2 * chains * state : 0; // a middle rank sends and receives one state per chain
        return Make("lasp1", "lightning", compute, comm, compute + comm, perRank, perRank,
            $"{2 * chains} serial chain(s) of {ranks - 1} hops ({c.InterNodeHops} inter-node each), not overlapped");
    }

    /// <summary>
    /// LASP-1 as in the LASP paper's Algorithm 2: after receiving the state a rank computes its inter-chunk
    /// output and its state update (<c>2·B·H·n·D·Dv</c> FLOPs each) before sending, so every hop adds that
    /// compute to the chain (backward: the dKV update and the inter-chunk dQ, dK, dV terms, 6·B·H·n·D·Dv).
    /// </summary>
    private SchemeEstimate Lasp1Paper()
    {
        var c = new CollectiveCost(hardware, ranks);
        int chains = shape.Causal ? 1 : 2;
        double state = StateBytes(H), unit = 2 * B * H * LocalTokens * D * Dv;
        double hopCompute = 2 * unit / rates.LightningForward + 3 * unit / rates.LightningBackward;
        double comm = 2 * chains * c.SerialChain(state);
        double serial = chains * (ranks - 1) * hopCompute;
        double compute = LightningSeconds();
        double perRank = ranks > 1 ? 2 * chains * state : 0;
        return Make("lasp1-paper", "lightning", compute, comm, compute + comm + serial, perRank, perRank,
            FormattableString.Invariant($"as LASP Algorithm 2: each of the {ranks - 1} hops per chain also waits for the sender's inter-chunk output and state update ({hopCompute * 1e3:F3} ms per hop, fwd+bwd), not overlapped"));
    }

    /// <summary>
    /// LASP-2 as the paper runs it: each pass's all-gather overlaps the intra-chunk part of the kernels
    /// (forward <c>2·B·H·n·64·(D+Dv)/2</c> FLOPs, backward 2×), so only what exceeds it is exposed.
    /// </summary>
    private SchemeEstimate Lasp2Overlapped()
    {
        var c = new CollectiveCost(hardware, ranks);
        int chunks = shape.Causal ? 2 : 1;
        double block = chunks * StateBytes(H);
        double gather = c.AllGather(block);
        double intra = shape.Causal ? 2 * B * H * LocalTokens * 64 * (D + Dv) / 2 : 0;
        double exposed = Math.Max(0, gather - intra / rates.LightningForward) + Math.Max(0, gather - 2 * intra / rates.LightningBackward);
        double compute = LightningSeconds();
        return Make("lasp2-paper", "lightning", compute, 2 * gather, compute + exposed, 2 * block, 2 * ranks * block,
            "one all-gather per pass, hidden behind the intra-chunk compute (as in the LASP-2 paper)");
    }

    /// <summary>
    /// A ring for linear attention that keeps the right-product trick: K, V blocks go round as in ring
    /// attention, and each block adds <c>Q_i (K_jᵀ V_j)</c>: the compute of one lightning pass plus a state
    /// per block. Each transfer hides behind its step's kernels.
    /// </summary>
    private SchemeEstimate RingLinear()
    {
        var c = new CollectiveCost(hardware, ranks);
        double kv = B * LocalTokens * shape.KvHeads * (D + Dv) * E;
        double step = LightningSeconds() / ranks + 2 * (2 * B * H * LocalTokens * D * Dv) / rates.LightningForward;
        double tf = c.RingStep(kv), tb = c.RingStep(2 * kv);
        double total = ranks > 1 ? 2 * step + (ranks - 1) * (Math.Max(step, tf) + Math.Max(step, tb)) + tb : LightningSeconds();
        double compute = ranks > 1 ? 2 * ranks * step : LightningSeconds();
        double sent = (ranks - 1) * kv + (ranks > 1 ? ranks * 2 * kv : 0);
        return Make("ring-linear", "lightning", compute, (ranks - 1) * tf + (ranks > 1 ? ranks * tb : 0), total, sent, sent,
            "ring of K,V blocks with the right-product trick (Q_i·(K_jᵀV_j) per block), transfers hidden behind each step");
    }

    private SchemeEstimate Ring(bool quadraticLinear)
    {
        var c = new CollectiveCost(hardware, ranks);
        double kv = B * LocalTokens * shape.KvHeads * (D + Dv) * E;
        var (cf, cb) = QuadraticSeconds(quadraticLinear ? 2 : 2.5);
        cf /= ranks;
        cb /= ranks;
        double tf = c.RingStep(kv), tb = c.RingStep(2 * kv);
        double forward = cf + (ranks - 1) * Math.Max(cf, tf);
        double backward = ranks > 1 ? cb + (ranks - 1) * Math.Max(cb, tb) + tb : cb;
        double compute = ranks * (cf + cb), comm = (ranks - 1) * tf + (ranks > 1 ? ranks * tb : 0);
        double sent = (ranks - 1) * kv + (ranks > 1 ? ranks * 2 * kv : 0);
        return Make("ring", quadraticLinear ? "lightning" : "softmax", compute, comm, forward + backward, sent, sent,
            (quadraticLinear ? "linear attention blockwise without the right-product trick (QKᵀ then ·V, quadratic in N, at the flash rate); " : "")
            + $"P−1 K,V transfers forward and P K,V,dK,dV transfers backward, each hidden behind its step's kernels");
    }

    private SchemeEstimate AllGather()
    {
        var c = new CollectiveCost(hardware, ranks);
        double kv = B * LocalTokens * shape.KvHeads * (D + Dv) * E;
        var (cf, cb) = QuadraticSeconds(2.5);
        double comm = c.AllGather(kv) + c.ReduceScatter(kv);
        return Make("allgather", "softmax", cf + cb, comm, cf + cb + comm, ranks > 1 ? kv + ranks * kv : 0, ranks > 1 ? ranks * kv + kv : 0,
            "all-gather K,V forward, reduce-scatter dK,dV backward, not overlapped");
    }

    private SchemeEstimate Ulysses(bool lightning)
    {
        string kind = lightning ? "lightning" : "softmax";
        if (shape.Heads % ranks != 0) return Infeasible("ulysses", kind, $"needs H % P == 0 (H = {shape.Heads}, P = {ranks})");
        var c = new CollectiveCost(hardware, ranks);
        double kvHeads = shape.KvHeads % ranks == 0 ? shape.KvHeads : shape.Heads; // replicated when Hk % P != 0
        double qkv = B * LocalTokens * (H * D + kvHeads * (D + Dv)) * E, o = B * LocalTokens * H * Dv * E;
        double comm = 2 * (c.AllToAll(qkv) + c.AllToAll(o));
        double compute = lightning ? LightningSeconds() : Sum(QuadraticSeconds(2.5));
        return Make("ulysses", kind, compute, comm, compute + comm, 2 * (qkv + o), 2 * (qkv + o), "all-to-all of Q,K,V and of O forward, of dO and dQ,dK,dV backward");
    }

    private SchemeEstimate Hybrid(bool lightning)
    {
        string kind = lightning ? "lightning" : "softmax";
        // Ph: the largest divisor of P that divides H and fits in a node, so the all-to-alls stay on NVLink.
        int ph = Enumerable.Range(1, ranks).Where(x => ranks % x == 0 && shape.Heads % x == 0 && x <= hardware.GpusPerNode).Max();
        int ps = ranks / ph;
        var inside = new CollectiveCost(hardware, ph);
        var across = new CollectiveCost(hardware, ps, stride: ph);
        double kvHeads = shape.KvHeads % ph == 0 ? shape.KvHeads : shape.Heads;
        double qkv = B * LocalTokens * (H * D + kvHeads * (D + Dv)) * E, o = B * LocalTokens * H * Dv * E;
        double ulysses = 2 * (inside.AllToAll(qkv) + inside.AllToAll(o));
        double groupHeads = H / ph, groupKv = kvHeads / ph, groupTokens = N / ps;
        double sequence, seqSent, seqReceived;
        if (lightning)
        {
            double block = (shape.Causal ? 2 : 1) * StateBytes(groupHeads);
            sequence = 2 * across.AllGather(block);
            (seqSent, seqReceived) = ps > 1 ? (2 * block, 2 * ps * block) : (0, 0);
        }
        else
        {
            double kv = B * groupTokens * groupKv * (D + Dv) * E;
            sequence = across.AllGather(kv) + across.ReduceScatter(kv);
            (seqSent, seqReceived) = ps > 1 ? (kv + ps * kv, ps * kv + kv) : (0, 0);
        }
        double compute = lightning ? LightningSeconds() : Sum(QuadraticSeconds(2.5));
        double u = ph > 1 ? 2 * (qkv + o) : 0;
        return Make("hybrid", kind, compute, ulysses + sequence, compute + ulysses + sequence, u + seqSent, u + seqReceived,
            $"Ph = {ph} (Ulysses inside a node) × Ps = {ps} ({(lightning ? "LASP-2" : "all-gather KV")} across), not overlapped");
    }

    private SchemeEstimate Partial()
    {
        var c = new CollectiveCost(hardware, ranks);
        double q = B * LocalTokens * H * D * E, partials = B * N * H * (Dv + 1) * E;
        double backGather = B * LocalTokens * H * (Dv + 2) * E, dq = B * LocalTokens * H * D * E;
        var (cf, cb) = QuadraticSeconds(2.5);
        double comm = c.AllGather(q) + c.AllToAll(partials) + c.AllGather(backGather) + c.ReduceScatter(dq);
        double sent = ranks > 1 ? q + partials + backGather + ranks * dq : 0;
        double received = ranks > 1 ? ranks * q + partials + ranks * backGather + dq : 0;
        return Make("partial", "softmax", cf + cb, comm, cf + cb + comm, sent, received,
            "all-gather Q, all-to-all of (O, LSE) partials forward; all-gather [dO|LSE|Drow], reduce-scatter dQ backward; work taken as balanced");
    }

    private static double Sum((double A, double B) x) => x.A + x.B;

    private static SchemeEstimate Make(string scheme, string attention, double compute, double comm, double total, double sent, double received, string note) =>
        new(scheme, attention, compute * 1e3, comm * 1e3, total * 1e3, sent, received, true, note);

    private static SchemeEstimate Infeasible(string scheme, string attention, string why) => new(scheme, attention, 0, 0, 0, 0, 0, false, why);
}

/// <summary>Reads kernel rates from a <c>dsattn bench kernels --json</c> file.</summary>
internal static class MeasuredKernelRates
{
    /// <summary>
    /// The GFLOP/s of flash-forward, flash-backward, lightning-forward and lightning-backward (the rows with
    /// the wanted causality when present, else any; the mean when there are several), as FLOP/s.
    /// </summary>
    /// <exception cref="ArgumentException">A missing file, bad JSON, or an op the file lacks (named).</exception>
    public static KernelRates Load(string path, bool causal)
    {
        if (!File.Exists(path)) throw new ArgumentException($"--kernels: the file '{path}' does not exist; write one with `dsattn bench kernels --json FILE`.", "kernels");
        System.Text.Json.JsonElement root;
        try { root = System.Text.Json.JsonDocument.Parse(File.ReadAllText(path)).RootElement; }
        catch (System.Text.Json.JsonException e) { throw new ArgumentException($"--kernels: '{path}' is not valid JSON: {e.Message}", "kernels", e); }
        if (root.ValueKind != System.Text.Json.JsonValueKind.Array) throw new ArgumentException($"--kernels: '{path}' must hold the JSON array `bench kernels --json` writes.", "kernels");
        var rows = root.EnumerateArray()
            .Where(r => r.TryGetProperty("op", out var op) && op.ValueKind == System.Text.Json.JsonValueKind.String && r.TryGetProperty("gflops", out var g) && g.ValueKind == System.Text.Json.JsonValueKind.Number)
            .Select(r => (Op: r.GetProperty("op").GetString()!, Causal: r.TryGetProperty("causal", out var c) && c.ValueKind == System.Text.Json.JsonValueKind.True, Gflops: r.GetProperty("gflops").GetDouble()))
            .ToList();
        double Rate(string op)
        {
            var all = rows.Where(r => r.Op == op).ToList();
            if (all.Count == 0) throw new ArgumentException($"--kernels: '{path}' has no \"{op}\" row; run `dsattn bench kernels --json FILE` with that op.", "kernels");
            var wanted = all.Where(r => r.Causal == causal).ToList();
            return (wanted.Count > 0 ? wanted : all).Average(r => r.Gflops) * 1e9;
        }
        double ff = Rate("flash-forward"), fb = Rate("flash-backward"), lf = Rate("lightning-forward"), lb = Rate("lightning-backward");
        return new KernelRates(ff, fb, lf, lb, FormattableString.Invariant($"measured ({path}): flash {ff / 1e9:F1}/{fb / 1e9:F1} GFLOP/s, lightning {lf / 1e9:F1}/{lb / 1e9:F1} GFLOP/s (forward/backward)"));
    }
}
