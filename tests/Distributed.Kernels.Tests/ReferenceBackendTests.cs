using Distributed.Reference;

namespace Distributed.Kernels.Tests;

/// <summary>
/// The contract on <see cref="ReferenceBackend"/>: it checks the suite itself (its shapes, options and
/// validation cases are reachable and consistent) and that the backend the scheme tests lean on is right.
/// </summary>
public sealed class ReferenceBackendTests : KernelBackendContract
{
    protected override IKernelBackend CreateBackend() => new ReferenceBackend();
}
