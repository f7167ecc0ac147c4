"""fdcam.concurrency: explainers shared by threads give the single-thread maps and leave the model and the global
TF32 flags as they were."""

import threading

import torch

import fdcam
from nets import assert_state_equal, small_images, small_net, state_of
from reference import assert_same_up_to_rounding


def run_threads(function, count):
    errors, results = [], [None] * count
    barrier = threading.Barrier(count)

    def worker(index):
        try:
            barrier.wait()
            results[index] = function(index)
        except BaseException as error:  # noqa: BLE001 — reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return results


def test_threads_making_the_first_call_on_a_new_explainer_all_succeed():
    model, x = small_net(), small_images()
    expected = fdcam.FDCAM(small_net(), "conv3")(x, targets=[1, 2])
    state = state_of(model)
    for _ in range(3):  # a new explainer each round: every round races on the first trace
        cam = fdcam.FDCAM(model, "conv3")
        results = run_threads(lambda i, cam=cam: cam(x, targets=[1, 2]), 4)
        for maps in results:
            assert_same_up_to_rounding(maps, expected)
    assert_state_equal(model, state)
    assert isinstance(model(x), torch.Tensor)  # not an fx Proxy


def test_threads_on_a_model_in_train_mode_never_change_it_or_the_global_flags():
    model, x = small_net(), small_images()
    expected = {name: fdcam.METHODS[name](small_net(), "conv3")(x, targets=[3, 4]) for name in ("fdcam", "gradcam")}
    model.train()
    model.bn1.eval()  # a mix of flags that must come back exactly
    model.conv3.weight.requires_grad_(False)
    state = state_of(model)
    cams = {name: fdcam.METHODS[name](model, "conv3") for name in expected}
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:

        def work(index):
            name = "fdcam" if index % 2 else "gradcam"
            return name, [cams[name](x, targets=[3, 4]) for _ in range(3)]

        for name, maps in run_threads(work, 6):
            for m in maps:
                assert_same_up_to_rounding(m, expected[name])
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert_state_equal(model, state)


def test_tf32_flags_are_shared_by_threads_with_one_setting_and_restored():
    from fdcam.tail import tail_precision

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    seen = []

    def work(index):
        precision = "tf32" if index % 2 else "fp32"
        for _ in range(20):
            with tail_precision(precision, torch.device("cpu")):
                seen.append((precision, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    run_threads(work, 4)
    assert all((matmul, cudnn) == (p == "tf32", p == "tf32") for p, matmul, cudnn in seen)
    assert len(seen) == 80
    with tail_precision("fp32", torch.device("cpu")):  # nested, the other setting, in one thread
        with tail_precision("tf32", torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved
