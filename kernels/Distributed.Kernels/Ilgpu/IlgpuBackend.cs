using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;
using ILGPU.Runtime.OpenCL;

namespace Distributed.Kernels.Ilgpu;

/// <summary>
/// The block operations as ILGPU kernels on one accelerator (CUDA, OpenCL or ILGPU's CPU accelerator).
/// Tensors are <see cref="IlgpuTensor"/> device buffers and stay on the device between operations; every
/// kernel runs on the accelerator's default stream, so operations are ordered without host syncs.
/// </summary>
/// <remarks>Head dims of the softmax and lightning operations are limited to <c>D, Dv ≤ 128</c> (the register
/// accumulators and shared tiles).</remarks>
public sealed partial class IlgpuBackend : IKernelBackend
{
    private readonly Context _context;
    private readonly Accelerator _accelerator;

    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, FlashParams> _flashForward;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, FlashParams> _flashDq;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, FlashParams> _flashDkDv;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, Int4> _rowDot;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, Int4> _merge;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, Int4, Int4> _copySlice;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams> _blockState;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams> _blockGrad;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams, Int4> _scanForward;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams, Int4> _scanBackward;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams> _output;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams> _gradQ;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams> _gradKV;

    // Scratch reused across calls: block states (forward and backward) and ln λ per head.
    private MemoryBuffer1D<float, Stride1D.Dense>? _statesA, _statesB, _lnDecay;
    private float[]? _lastDecay;
    private bool _disposed;

    private IlgpuBackend(Context context, Accelerator accelerator, string name)
    {
        _context = context;
        _accelerator = accelerator;
        Name = name;
        var a = accelerator;
        _flashForward = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, FlashParams>(FlashKernels.Forward);
        _flashDq = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, FlashParams>(FlashKernels.BackwardDq);
        _flashDkDv = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, FlashParams>(FlashKernels.BackwardDkDv);
        _rowDot = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, Int4>(ElementwiseKernels.RowDot);
        _merge = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, Int4>(ElementwiseKernels.Merge);
        _copySlice = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, Int4, Int4>(ElementwiseKernels.CopySlice);
        _blockState = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams>(LightningKernels.BlockState);
        _blockGrad = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams>(LightningKernels.BlockGrad);
        _scanForward = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams, Int4>(LightningKernels.ScanForward);
        _scanBackward = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams, Int4>(LightningKernels.ScanBackward);
        _output = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams>(LightningKernels.Output);
        _gradQ = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams>(LightningKernels.GradQ);
        _gradKV = a.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, LightningParams>(LightningKernels.GradKV);
    }

    /// <inheritdoc/>
    public string Name { get; }

    /// <summary>The ILGPU accelerator the kernels run on.</summary>
    public Accelerator Accelerator => _accelerator;

    /// <summary>ILGPU's CPU accelerator: a debugging engine about 1,000x slower than a GPU; for tests.</summary>
    public static IlgpuBackend CreateCpu()
    {
        // 4 warps of 32 lanes: the flash kernels need 128-thread groups and 32-lane warps (their shuffles
        // reduce over lanes 8·rg .. 8·rg + 7 and pass P between them).
        var context = Context.Create(b => b.CPU(new CPUDevice(32, FlashKernels.GroupSize / 32, 1)).EnableAlgorithms());
        try
        {
            return new IlgpuBackend(context, context.CreateCPUAccelerator(0), "ilgpu-cpu");
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    /// <summary>CUDA devices ILGPU sees; 0 without a GPU or driver.</summary>
    public static int CudaDeviceCount()
    {
        try
        {
            using var context = Context.Create(b => b.Cuda());
            return context.GetCudaDevices().Count;
        }
        catch (Exception)
        {
            return 0;
        }
    }

    /// <summary>The CUDA device <paramref name="deviceIndex"/>, or null when there is none (no GPU or no driver).</summary>
    public static IlgpuBackend? TryCreateCuda(int deviceIndex = 0)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(deviceIndex);
        Context? context = null;
        try
        {
            context = Context.Create(b => b.Cuda().EnableAlgorithms());
            var devices = context.GetCudaDevices();
            if (deviceIndex >= devices.Count)
            {
                context.Dispose();
                return null;
            }
            return new IlgpuBackend(context, devices[deviceIndex].CreateAccelerator(context), "ilgpu-cuda");
        }
        catch (Exception e) when (e is not ArgumentException)
        {
            context?.Dispose();
            return null;
        }
    }

    /// <summary>
    /// The first OpenCL device with the generic address space (ILGPU needs it), or null when none is usable;
    /// PoCL on this machine lacks it and is refused.
    /// </summary>
    public static IlgpuBackend? TryCreateOpenCL()
    {
        Context? context = null;
        try
        {
            context = Context.Create(b => b.OpenCL().EnableAlgorithms());
            foreach (var device in context.GetCLDevices())
            {
                if (!device.Capabilities.GenericAddressSpace) continue;
                return new IlgpuBackend(context, device.CreateAccelerator(context), "ilgpu-opencl");
            }
            context.Dispose();
            return null;
        }
        catch (Exception)
        {
            context?.Dispose();
            return null;
        }
    }

    /// <summary>CUDA when a device is present, else a usable OpenCL device, else the CPU accelerator.</summary>
    public static IlgpuBackend CreateBest() => TryCreateCuda() ?? TryCreateOpenCL() ?? CreateCpu();

    /// <inheritdoc/>
    public DeviceTensor Allocate(params int[] shape)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        return new IlgpuTensor(_accelerator, shape);
    }

    /// <summary>Whether <see cref="Dispose"/> has run.</summary>
    public bool IsDisposed => _disposed;

    /// <summary>
    /// A host array of <paramref name="length"/> floats, pinned and page-locked for this accelerator (ILGPU's
    /// <c>AllocatePageLocked1D</c>; a no-op lock on the CPU accelerator), for staging device tensors at the
    /// communicator boundary: <see cref="DeviceTensor.CopyToHost"/> and <see cref="DeviceTensor.CopyFromHost"/>
    /// into its array (<c>GetArray()</c>) are then one DMA each way. Dispose it to release the lock; the
    /// accelerator releases it too when it is disposed.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="length"/> is negative.</exception>
    public PageLockedArray1D<float> AllocatePageLocked(int length)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        return _accelerator.AllocatePageLocked1D<float>(length, true);
    }

    /// <inheritdoc/>
    public void Clear(DeviceTensor tensor) => Own(tensor, nameof(tensor)).View.MemSetToZero();

    /// <inheritdoc/>
    public void CopySlice(DeviceTensor source, int srcStart, DeviceTensor destination, int dstStart, int count, int axis)
    {
        var src = Own(source, nameof(source));
        var dst = Own(destination, nameof(destination));
        if (axis < 0 || axis >= source.Shape.Count)
            throw new ArgumentOutOfRangeException(nameof(axis), $"axis {axis} is outside the {source.Shape.Count} dims of source {source}.");
        if (destination.Shape.Count != source.Shape.Count)
            throw new ArgumentException($"destination {destination} must have the rank of source {source}.", nameof(destination));
        for (int d = 0; d < source.Shape.Count; d++)
            if (d != axis && source.Shape[d] != destination.Shape[d])
                throw new ArgumentException($"destination {destination} differs from source {source} in dim {d}; only the axis {axis} may differ.", nameof(destination));
        if (count < 0) throw new ArgumentOutOfRangeException(nameof(count), $"count {count} must be non-negative.");
        if (srcStart < 0 || srcStart + count > source.Shape[axis])
            throw new ArgumentOutOfRangeException(nameof(srcStart), $"[{srcStart}, {srcStart + count}) is outside source axis {axis} of length {source.Shape[axis]}.");
        if (dstStart < 0 || dstStart + count > destination.Shape[axis])
            throw new ArgumentOutOfRangeException(nameof(dstStart), $"[{dstStart}, {dstStart + count}) is outside destination axis {axis} of length {destination.Shape[axis]}.");
        long outer = 1, inner = 1;
        for (int d = 0; d < axis; d++) outer *= source.Shape[d];
        for (int d = axis + 1; d < source.Shape.Count; d++) inner *= source.Shape[d];
        long total = outer * count * inner;
        if (total == 0) return;
        var dims = new Int4(checked((int)outer), count, checked((int)inner), 0);
        bool overlapping = ReferenceEquals(src, dst) && srcStart != dstStart
            && srcStart < dstStart + count && dstStart < srcStart + count;
        if (overlapping)
        {
            // Threads copy in no particular order, so an overlapping move goes through a staging tensor.
            using var staging = new IlgpuTensor(_accelerator, [dims.X, count, dims.Z]);
            _copySlice(Elementwise(total), src.View, staging.View, dims, new Int4(source.Shape[axis], srcStart, count, 0));
            AfterLaunch();
            _copySlice(Elementwise(total), staging.View, dst.View, dims, new Int4(count, 0, destination.Shape[axis], dstStart));
            // The staging buffer must outlive the copy that reads it.
            _accelerator.Synchronize();
            return;
        }
        _copySlice(Elementwise(total), src.View, dst.View, dims,
            new Int4(source.Shape[axis], srcStart, destination.Shape[axis], dstStart));
        AfterLaunch();
    }

    /// <inheritdoc/>
    public void FlashForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o, DeviceTensor lse, in FlashOptions options)
    {
        var dims = FlashDims(q, k, v);
        AttentionDims.Expect(o, nameof(o), dims.B, dims.Nq, dims.H, dims.Dv);
        AttentionDims.Expect(lse, nameof(lse), dims.B, dims.H, dims.Nq);
        if (dims.Nq == 0) return;
        var p = Params(dims, options);
        int groups = dims.B * dims.H * ((dims.Nq + FlashKernels.Rows - 1) / FlashKernels.Rows);
        _flashForward(new KernelConfig(groups, FlashKernels.GroupSize), View(q), View(k), View(v), View(o), View(lse), p);
        AfterLaunch();
    }

    /// <inheritdoc/>
    public void SoftmaxRowDot(DeviceTensor o, DeviceTensor dO, DeviceTensor drow)
    {
        ArgumentNullException.ThrowIfNull(o);
        if (o.Shape.Count != 4) throw new ArgumentException($"o is {o} but must be 4-D [B, N, H, Dv].", nameof(o));
        int b = o.Shape[0], n = o.Shape[1], h = o.Shape[2], dv = o.Shape[3];
        AttentionDims.Expect(dO, nameof(dO), b, n, h, dv);
        AttentionDims.Expect(drow, nameof(drow), b, h, n);
        long rows = (long)b * h * n;
        if (rows == 0) return;
        _rowDot(Elementwise(rows), View(o), View(dO), View(drow), new Int4(b, n, h, dv));
        AfterLaunch();
    }

    /// <inheritdoc/>
    public void FlashBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor lse, DeviceTensor drow, DeviceTensor dO,
        DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, in FlashOptions options)
    {
        var dims = FlashDims(q, k, v);
        AttentionDims.Expect(lse, nameof(lse), dims.B, dims.H, dims.Nq);
        AttentionDims.Expect(drow, nameof(drow), dims.B, dims.H, dims.Nq);
        AttentionDims.Expect(dO, nameof(dO), dims.B, dims.Nq, dims.H, dims.Dv);
        AttentionDims.Expect(dQ, nameof(dQ), dims.B, dims.Nq, dims.H, dims.D);
        AttentionDims.Expect(dK, nameof(dK), dims.B, dims.Nk, dims.Hk, dims.D);
        AttentionDims.Expect(dV, nameof(dV), dims.B, dims.Nk, dims.Hk, dims.Dv);
        var p = Params(dims, options);
        if (dims.Nq > 0)
        {
            int groups = dims.B * dims.H * ((dims.Nq + FlashKernels.Rows - 1) / FlashKernels.Rows);
            _flashDq(new KernelConfig(groups, FlashKernels.GroupSize), View(q), View(k), View(v), View(lse), View(drow), View(dO), View(dQ), p);
            AfterLaunch();
        }
        if (dims.Nk > 0)
        {
            int groups = dims.B * dims.Hk * ((dims.Nk + FlashKernels.Rows - 1) / FlashKernels.Rows);
            _flashDkDv(new KernelConfig(groups, FlashKernels.GroupSize), View(q), View(k), View(v), View(lse), View(drow), View(dO), View(dK), View(dV), p);
            AfterLaunch();
        }
    }

    /// <inheritdoc/>
    public void MergeSoftmax(DeviceTensor oA, DeviceTensor lseA, DeviceTensor oB, DeviceTensor lseB)
    {
        ArgumentNullException.ThrowIfNull(oA);
        if (oA.Shape.Count != 4) throw new ArgumentException($"oA is {oA} but must be 4-D [B, N, H, Dv].", nameof(oA));
        int b = oA.Shape[0], n = oA.Shape[1], h = oA.Shape[2], dv = oA.Shape[3];
        AttentionDims.Expect(lseA, nameof(lseA), b, h, n);
        AttentionDims.Expect(oB, nameof(oB), b, n, h, dv);
        AttentionDims.Expect(lseB, nameof(lseB), b, h, n);
        long rows = (long)b * h * n;
        if (rows == 0) return;
        _merge(Elementwise(rows), View(oA), View(lseA), View(oB), View(lseB), new Int4(b, n, h, dv));
        AfterLaunch();
    }

    /// <inheritdoc/>
    public void LightningForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor o, DeviceTensor? sEnd)
    {
        var dims = LightningDims(q, k, v);
        AttentionDims.CheckDecay(decay, dims.H);
        if (s0 is not null) AttentionDims.Expect(s0, nameof(s0), dims.B, dims.H, dims.D, dims.Dv);
        AttentionDims.Expect(o, nameof(o), dims.B, dims.Nq, dims.H, dims.Dv);
        if (sEnd is not null) AttentionDims.Expect(sEnd, nameof(sEnd), dims.B, dims.H, dims.D, dims.Dv);
        if (dims.Nq == 0)
        {
            // An empty chunk passes the state through unchanged.
            if (sEnd is not null)
            {
                if (s0 is null) Clear(sEnd);
                else CopySlice(s0, 0, sEnd, 0, dims.B, 0);
            }
            return;
        }
        var p = LParams(dims, causal);
        var ln = UploadLnDecay(decay);
        var states = Scratch(ref _statesA, (long)dims.B * dims.H * p.T * dims.D * dims.Dv);
        _blockState(StateTiles(p), View(k), View(v), ln, states, p);
        AfterLaunch();
        _scanForward(Elementwise((long)dims.B * dims.H * dims.D * dims.Dv), states, s0 is null ? states : View(s0),
            sEnd is null ? states : View(sEnd), ln, p, new Int4(s0 is null ? 0 : 1, sEnd is null ? 0 : 1, 0, 0));
        AfterLaunch();
        _output(RowTiles(dims.B * dims.H, dims.Nq), View(q), View(k), View(v), ln, states, View(o), p);
        AfterLaunch();
    }

    /// <inheritdoc/>
    public void LightningBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, DeviceTensor? dS0)
    {
        var dims = LightningDims(q, k, v);
        AttentionDims.CheckDecay(decay, dims.H);
        dims.ExpectLightningGradients(s0, dO, dSEnd, dQ, dK, dV);
        if (dS0 is not null) AttentionDims.Expect(dS0, nameof(dS0), dims.B, dims.H, dims.D, dims.Dv);
        if (dims.Nq == 0)
        {
            if (dS0 is not null)
            {
                if (dSEnd is null) Clear(dS0);
                else CopySlice(dSEnd, 0, dS0, 0, dims.B, 0);
            }
            return;
        }
        var p = LParams(dims, causal);
        var ln = UploadLnDecay(decay);
        long stateCount = (long)dims.B * dims.H * p.T * dims.D * dims.Dv;
        long headStates = (long)dims.B * dims.H * dims.D * dims.Dv;
        var states = Scratch(ref _statesA, stateCount);
        var grads = Scratch(ref _statesB, stateCount);

        // Forward states (entering each block; non-causal: the total S) feed dQ.
        _blockState(StateTiles(p), View(k), View(v), ln, states, p);
        AfterLaunch();
        _scanForward(Elementwise(headStates), states, s0 is null ? states : View(s0), states, ln, p, new Int4(s0 is null ? 0 : 1, 0, 0, 0));
        AfterLaunch();
        // Backward states (leaving each block; non-causal: the total dS) feed dK and dV.
        _blockGrad(StateTiles(p), View(q), View(dO), ln, grads, p);
        AfterLaunch();
        _scanBackward(Elementwise(headStates), grads, dSEnd is null ? grads : View(dSEnd), dS0 is null ? grads : View(dS0), ln, p,
            new Int4(dSEnd is null ? 0 : 1, dS0 is null ? 0 : 1, 0, 0));
        AfterLaunch();

        _gradQ(RowTiles(dims.B * dims.H, dims.Nq), View(k), View(v), View(dO), ln, states, View(dQ), p);
        AfterLaunch();
        _gradKV(RowTiles(dims.B * dims.Hk, dims.Nq), View(q), View(k), View(v), View(dO), ln, grads, View(dK), View(dV), p);
        AfterLaunch();
    }

    /// <inheritdoc/>
    public void LightningChunkState(DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal, DeviceTensor m)
    {
        ArgumentNullException.ThrowIfNull(k);
        ArgumentNullException.ThrowIfNull(v);
        if (k.Shape.Count != 4) throw new ArgumentException($"k is {k} but must be 4-D [B, N, Hk, D].", nameof(k));
        ArgumentNullException.ThrowIfNull(m);
        if (m.Shape.Count != 4) throw new ArgumentException($"m is {m} but must be 4-D [B, H, D, Dv].", nameof(m));
        int b = k.Shape[0], n = k.Shape[1], hk = k.Shape[2], d = k.Shape[3];
        if (v.Shape.Count != 4 || v.Shape[0] != b || v.Shape[1] != n || v.Shape[2] != hk)
            throw new ArgumentException($"v is {v} but must be [B={b}, N={n}, Hk={hk}, Dv] to match k {k}.", nameof(v));
        int h = m.Shape[1], dv = v.Shape[3];
        if (hk < 1 || h % hk != 0) throw new ArgumentException($"m has {h} heads and k has {hk}; GQA needs H % Hk == 0.", nameof(m));
        AttentionDims.Expect(m, nameof(m), b, h, d, dv);
        AttentionDims.CheckDecay(decay, h);
        CheckLightningHeadDims(d, nameof(k), dv, nameof(v));
        if (n == 0)
        {
            Clear(m);
            return;
        }
        var p = new LightningParams { B = b, N = n, H = h, Hk = hk, D = d, Dv = dv, Bs = n, T = 1, Causal = causal ? 1 : 0 };
        _blockState(StateTiles(p), View(k), View(v), UploadLnDecay(decay), View(m), p);
        AfterLaunch();
    }

    /// <inheritdoc/>
    public void LightningChunkStateBackward(DeviceTensor q, DeviceTensor dO, ReadOnlySpan<float> decay, bool causal, DeviceTensor dM)
    {
        ArgumentNullException.ThrowIfNull(q);
        if (q.Shape.Count != 4) throw new ArgumentException($"q is {q} but must be 4-D [B, N, H, D].", nameof(q));
        ArgumentNullException.ThrowIfNull(dO);
        if (dO.Shape.Count != 4) throw new ArgumentException($"dO is {dO} but must be 4-D [B, N, H, Dv].", nameof(dO));
        int b = q.Shape[0], n = q.Shape[1], h = q.Shape[2], d = q.Shape[3], dv = dO.Shape[3];
        AttentionDims.Expect(dO, nameof(dO), b, n, h, dv);
        AttentionDims.Expect(dM, nameof(dM), b, h, d, dv);
        AttentionDims.CheckDecay(decay, h);
        CheckLightningHeadDims(d, nameof(q), dv, nameof(dO));
        if (n == 0)
        {
            Clear(dM);
            return;
        }
        var p = new LightningParams { B = b, N = n, H = h, Hk = h, D = d, Dv = dv, Bs = n, T = 1, Causal = causal ? 1 : 0 };
        _blockGrad(StateTiles(p), View(q), View(dO), UploadLnDecay(decay), View(dM), p);
        AfterLaunch();
    }

    /// <inheritdoc/>
    public void Synchronize() => _accelerator.Synchronize();

    /// <inheritdoc/>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _statesA?.Dispose();
        _statesB?.Dispose();
        _lnDecay?.Dispose();
        _accelerator.Dispose();
        _context.Dispose();
    }

    // ----- helpers ------------------------------------------------------------------------------------

    private IlgpuTensor Own(DeviceTensor tensor, string name)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(tensor, name);
        if (tensor is not IlgpuTensor t || !ReferenceEquals(t.Accelerator, _accelerator))
            throw new ArgumentException($"{name} was not allocated by this {Name} backend; allocate it with Allocate on the same backend.", name);
        return t;
    }

    private ArrayView<float> View(DeviceTensor tensor, [System.Runtime.CompilerServices.CallerArgumentExpression(nameof(tensor))] string name = "")
        => Own(tensor, name).View;

    private AttentionDims FlashDims(DeviceTensor q, DeviceTensor k, DeviceTensor v)
    {
        var dims = AttentionDims.FromQkv(q, k, v);
        if (dims.D > FlashKernels.MaxHeadDim)
            throw new ArgumentException($"q has head dim {dims.D}; the ILGPU softmax kernels support D ≤ {FlashKernels.MaxHeadDim}.", nameof(q));
        if (dims.Dv > FlashKernels.MaxHeadDim)
            throw new ArgumentException($"v has head dim {dims.Dv}; the ILGPU softmax kernels support Dv ≤ {FlashKernels.MaxHeadDim}.", nameof(v));
        Own(q, nameof(q));
        Own(k, nameof(k));
        Own(v, nameof(v));
        return dims;
    }

    private AttentionDims LightningDims(DeviceTensor q, DeviceTensor k, DeviceTensor v)
    {
        var dims = AttentionDims.FromQkv(q, k, v);
        if (dims.Nk != dims.Nq)
            throw new ArgumentException($"k has {dims.Nk} rows but q has {dims.Nq}; a lightning chunk needs the same N for Q, K and V.", nameof(k));
        CheckLightningHeadDims(dims.D, nameof(q), dims.Dv, nameof(v));
        Own(q, nameof(q));
        Own(k, nameof(k));
        Own(v, nameof(v));
        return dims;
    }

    /// <summary>The tiled lightning kernels hold up to 128 accumulator columns and stage 128-wide tiles.</summary>
    private static void CheckLightningHeadDims(int d, string dName, int dv, string dvName)
    {
        if (d > LightningKernels.MaxHeadDim)
            throw new ArgumentException($"{dName} has head dim {d}; the ILGPU lightning kernels support D ≤ {LightningKernels.MaxHeadDim}.", dName);
        if (dv > LightningKernels.MaxHeadDim)
            throw new ArgumentException($"{dvName} has head dim {dv}; the ILGPU lightning kernels support Dv ≤ {LightningKernels.MaxHeadDim}.", dvName);
    }

    private static FlashParams Params(in AttentionDims d, in FlashOptions options) => new()
    {
        B = d.B, Nq = d.Nq, Nk = d.Nk, H = d.H, Hk = d.Hk, D = d.D, Dv = d.Dv,
        QueryOffset = options.QueryOffset, KeyOffset = options.KeyOffset,
        Causal = options.Causal ? 1 : 0, Accumulate = options.Accumulate ? 1 : 0,
        Scale = options.ScaleFor(d.D),
    };

    private static LightningParams LParams(in AttentionDims d, bool causal)
    {
        int bs = causal ? LightningKernels.BlockSize : d.Nq;
        return new LightningParams
        {
            B = d.B, N = d.Nq, H = d.H, Hk = d.Hk, D = d.D, Dv = d.Dv,
            Bs = bs, T = (d.Nq + bs - 1) / bs, Causal = causal ? 1 : 0, Intra = causal ? 1 : 0,
        };
    }

    private KernelConfig Elementwise(long count)
    {
        // Grid-stride kernels: enough groups to fill a GPU, never more than the work needs.
        int size = Math.Min(ElementwiseKernels.GroupSize, _accelerator.MaxNumThreadsPerGroup);
        long groups = Math.Clamp((count + size - 1) / size, 1, 65_535);
        return new KernelConfig((int)groups, size);
    }

    /// <summary>
    /// ILGPU's CPU accelerator gave wrong results now and then (once an aborted test host) when kernels
    /// were queued back to back; waiting for each one there removes the overlap. GPUs order launches on
    /// the stream and need no wait.
    /// </summary>
    private void AfterLaunch()
    {
        if (_accelerator.AcceleratorType == AcceleratorType.CPU) _accelerator.Synchronize();
    }

    /// <summary>The tiled lightning row kernels: one group per 64-row tile of each (batch, head).</summary>
    private static KernelConfig RowTiles(int heads, int rows) =>
        new(heads * ((rows + LightningKernels.Rows - 1) / LightningKernels.Rows), LightningKernels.GroupSize);

    /// <summary>The tiled state kernels: one group per 64 state rows of each (batch, head, block).</summary>
    private static KernelConfig StateTiles(in LightningParams p) =>
        new(p.B * p.H * p.T * ((p.D + LightningKernels.Rows - 1) / LightningKernels.Rows), LightningKernels.GroupSize);

    private ArrayView<float> Scratch(ref MemoryBuffer1D<float, Stride1D.Dense>? buffer, long length)
    {
        if (buffer is null || buffer.Length < length)
        {
            // The default stream may still be reading the old buffer.
            _accelerator.Synchronize();
            buffer?.Dispose();
            buffer = _accelerator.Allocate1D<float>(Math.Max(length, 1));
        }
        return buffer.View.SubView(0, Math.Max(length, 1));
    }

    private ArrayView<float> UploadLnDecay(ReadOnlySpan<float> decay)
    {
        // The same λ is passed on every step; skipping the copy avoids a host sync per call.
        if (_lnDecay is not null && _lastDecay is not null && decay.SequenceEqual(_lastDecay))
            return _lnDecay.View.SubView(0, Math.Max(decay.Length, 1));
        var ln = new float[Math.Max(decay.Length, 1)];
        for (int h = 0; h < decay.Length; h++) ln[h] = (float)Math.Log(decay[h]);
        var view = Scratch(ref _lnDecay, ln.Length);
        // A queued kernel may still read the previous values.
        _accelerator.Synchronize();
        // Pinned until the copy completes: ILGPU takes a raw pointer from the ref.
        unsafe
        {
            fixed (float* pinned = ln)
            {
                view.CopyFromCPU(ref *pinned, ln.Length);
                _accelerator.Synchronize();
            }
        }
        _lastDecay = decay.ToArray();
        return view;
    }
}
