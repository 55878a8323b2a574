using BenchmarkDotNet.Attributes;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;

namespace Distributed.Benchmarks;

/// <summary>Flash forward and backward on the CPU backend; N = 1000 is not a multiple of the 64-row tile.</summary>
[MemoryDiagnoser]
public class Perf_FlashAttention : IDisposable
{
    private CpuBackend _backend = null!;
    private DeviceTensor _q = null!, _k = null!, _v = null!, _o = null!, _lse = null!, _drow = null!, _dq = null!, _dk = null!, _dv = null!;

    [Params(1000, 4096)]
    public int N { get; set; }

    [Params(false, true)]
    public bool Causal { get; set; }

    private const int H = 8, D = 64;

    [GlobalSetup]
    public void Setup()
    {
        _backend = new CpuBackend();
        var rnd = new Random(1);
        DeviceTensor Fill(params int[] s)
        {
            var t = _backend.Allocate(s);
            var host = new float[t.Length];
            for (int i = 0; i < host.Length; i++) host[i] = (float)(rnd.NextDouble() - 0.5);
            t.CopyFromHost(host);
            return t;
        }
        (_q, _k, _v) = (Fill(1, N, H, D), Fill(1, N, H, D), Fill(1, N, H, D));
        _o = _backend.Allocate(1, N, H, D);
        _lse = _backend.Allocate(1, H, N);
        _drow = _backend.Allocate(1, H, N);
        (_dq, _dk, _dv) = (_backend.Allocate(1, N, H, D), _backend.Allocate(1, N, H, D), _backend.Allocate(1, N, H, D));
        _backend.FlashForward(_q, _k, _v, _o, _lse, new FlashOptions(Causal: Causal));
        _backend.SoftmaxRowDot(_o, _o, _drow);
    }

    [Benchmark]
    public void Forward() => _backend.FlashForward(_q, _k, _v, _o, _lse, new FlashOptions(Causal: Causal));

    [Benchmark]
    public void Backward() => _backend.FlashBackward(_q, _k, _v, _lse, _drow, _o, _dq, _dk, _dv, new FlashOptions(Causal: Causal));

    [GlobalCleanup]
    public void Dispose()
    {
        foreach (var t in new[] { _q, _k, _v, _o, _lse, _drow, _dq, _dk, _dv }) t?.Dispose();
        _backend?.Dispose();
        GC.SuppressFinalize(this);
    }
}

/// <summary>The per-row steps: merge of partial softmax states, the softmax row term Drow, and a slice copy.</summary>
[MemoryDiagnoser]
public class Perf_MergeSoftmax : IDisposable
{
    private CpuBackend _backend = null!;
    private DeviceTensor _oa = null!, _la = null!, _ob = null!, _lb = null!, _half = null!;

    [Params(1000, 4096)]
    public int N { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _backend = new CpuBackend();
        (_oa, _ob) = (_backend.Allocate(1, N, 8, 64), _backend.Allocate(1, N, 8, 64));
        (_la, _lb) = (_backend.Allocate(1, 8, N), _backend.Allocate(1, 8, N));
        _half = _backend.Allocate(1, N / 2, 8, 64);
    }

    [Benchmark]
    public void Merge() => _backend.MergeSoftmax(_oa, _la, _ob, _lb);

    [Benchmark]
    public void RowDot() => _backend.SoftmaxRowDot(_oa, _ob, _la);

    [Benchmark]
    public void CopySlice() => _backend.CopySlice(_oa, N / 2, _half, 0, N / 2, 1);

    [GlobalCleanup]
    public void Dispose()
    {
        foreach (var t in new[] { _oa, _la, _ob, _lb, _half }) t?.Dispose();
        _backend?.Dispose();
        GC.SuppressFinalize(this);
    }
}
