using Distributed.Reference;
using Xunit;

namespace Distributed.Kernels.Tests;

/// <summary>
/// The contract on <see cref="ReferenceBackend"/>: it checks the suite itself (its shapes, options and
/// validation cases are reachable and consistent) and that the backend the scheme tests lean on is right.
/// </summary>
public sealed class ReferenceBackendTests : KernelBackendContract
{
    protected override IKernelBackend CreateBackend() => new ReferenceBackend();

    [Fact]
    public void Name_IsReference() => Assert.Equal("reference", Backend.Name);

    [Fact]
    public void CopySlice_OverlappingWithinOneTensor_MovesLikeTwoTensors()
    {
        using var t = Backend.Allocate(1, 6, 2);
        t.CopyFromHost([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        Backend.CopySlice(t, 0, t, 1, 4, axis: 1);
        var got = new float[12];
        t.CopyToHost(got);
        Assert.Equal(new float[] { 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 10, 11 }, got);
    }

    [Fact]
    public void HostTensor_ExposesItsElementsRowMajor()
    {
        var t = (HostTensor)Backend.Allocate(2, 3);
        t.CopyFromHost([1, 2, 3], 3);
        Assert.Equal(new float[] { 0, 0, 0, 1, 2, 3 }, t.Data);
    }
}
