using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Run;

/// <summary>TEMPORARY: filled in when the check branch lands.</summary>
internal static class SampledCheck
{
    public static List<CheckResult> Run(ICommunicator comm, JobSpec spec, AttentionShape shape, float[]? decay, RunSettings s,
        RunInputs inputs, IReadOnlyList<(int Start, int Count)> ranges, DeviceTensor o, DeviceTensor? lse, DeviceTensor? dO,
        DeviceTensor? dQ, DeviceTensor? dK, DeviceTensor? dV, Action<string> log) => [];
}
