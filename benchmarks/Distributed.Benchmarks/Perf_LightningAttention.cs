using BenchmarkDotNet.Attributes;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;

namespace Distributed.Benchmarks;

/// <summary>
/// Lightning forward/backward and the chunk-state helpers on the CPU backend, with decay. Time should grow
/// linearly in N; N = 8000 is not a multiple of the 64-token block.
/// </summary>
[MemoryDiagnoser]
public class Perf_LightningAttention : IDisposable
{
    private CpuBackend _backend = null!;
    private DeviceTensor _q = null!, _o = null!, _s = null!, _dq = null!, _dk = null!, _dv = null!;
    private float[] _decay = null!;

    [Params(8000, 16384, 32768)]
    public int N { get; set; }

    [Params(false, true)]
    public bool Causal { get; set; }

    private const int H = 8, D = 64;

    [GlobalSetup]
    public void Setup()
    {
        _backend = new CpuBackend();
        _q = _backend.Allocate(1, N, H, D);
        var host = new float[_q.Length];
        var rnd = new Random(1);
        for (int i = 0; i < host.Length; i++) host[i] = (float)(rnd.NextDouble() - 0.5) * 0.1f;
        _q.CopyFromHost(host);
        _o = _backend.Allocate(1, N, H, D);
        _s = _backend.Allocate(1, H, D, D);
        (_dq, _dk, _dv) = (_backend.Allocate(1, N, H, D), _backend.Allocate(1, N, H, D), _backend.Allocate(1, N, H, D));
        _decay = Distributed.SequenceParallelAttention.DefaultDecay(H);
    }

    [Benchmark]
    public void Forward() => _backend.LightningForward(_q, _q, _q, _decay, Causal, null, _o, _s);

    [Benchmark]
    public void Backward() => _backend.LightningBackward(_q, _q, _q, _decay, Causal, null, _o, null, _dq, _dk, _dv, null);

    [Benchmark]
    public void ChunkState() => _backend.LightningChunkState(_q, _q, _decay, Causal, _s);

    [Benchmark]
    public void ChunkStateBackward() => _backend.LightningChunkStateBackward(_q, _o, _decay, Causal, _s);

    [GlobalCleanup]
    public void Dispose()
    {
        foreach (var t in new[] { _q, _o, _s, _dq, _dk, _dv }) t?.Dispose();
        _backend?.Dispose();
        GC.SuppressFinalize(this);
    }
}
