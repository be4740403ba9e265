"""Tower evaluation metrics on constructed cases whose right answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from vilau_model.evaluation import (
    InceptionFeatureNet,
    answer_accuracy,
    parse_answer,
    RandomConvFeatureNet,
    codebook_usage,
    evaluate_tower,
    frechet_distance,
    load_frechet_feature_net,
    psnr,
    retrieval_recall,
    ssim,
    zero_shot_accuracy,
)


def _images(n=4, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- reconstruction quality


def test_perfect_reconstruction_gives_infinite_psnr_and_ssim_one():
    x = _images()
    assert psnr(x, x.clone()) == math.inf
    assert ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-12)


def test_psnr_known_value():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full((2, 3, 8, 8), 0.1)  # MSE 0.01 -> 10*log10(1/0.01) = 20 dB
    assert psnr(a, b) == pytest.approx(20.0)


def test_ssim_known_value_and_ordering():
    # Constant images have zero variance, so SSIM reduces to the luminance term
    # (2*mu_a*mu_b + C1) / (mu_a^2 + mu_b^2 + C1), C1 = 0.01^2.
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.6)
    c1 = 0.01**2
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1))

    x = _images()
    gen = torch.Generator().manual_seed(1)
    noisy = [(x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1) for s in (0.02, 0.1, 0.3)]
    scores = [ssim(x, y) for y in noisy]
    assert 1.0 > scores[0] > scores[1] > scores[2]
    assert ssim(x, noisy[1]) == pytest.approx(ssim(noisy[1], x))  # symmetric


# ---------------------------------------------------------------- Frechet distance


def _with_exact_moments(n, mean, cov, seed):
    """n samples whose sample mean and (unbiased) covariance are exactly `mean` and `cov`."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # whiten: cov(z) = I
    return z @ torch.linalg.cholesky(cov).T + mean


def test_identical_feature_sets_give_zero_distance():
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(feats, feats.clone()) == pytest.approx(0.0, abs=1e-9)
    # Also with fewer samples than dimensions (rank-deficient covariances, as in small eval sets).
    few = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    assert frechet_distance(few, few.clone()) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_known_gaussians():
    # N((0,0), diag(1,4)) vs N((3,0), diag(4,1)):
    # |mu|^2 = 9, tr = 5 + 5, tr sqrt(S_a S_b) = sqrt(4) + sqrt(4) = 4  ->  9 + 10 - 8 = 11
    a = _with_exact_moments(500, torch.tensor([0.0, 0.0]), torch.diag(torch.tensor([1.0, 4.0])).double(), 0)
    b = _with_exact_moments(500, torch.tensor([3.0, 0.0]), torch.diag(torch.tensor([4.0, 1.0])).double(), 1)
    assert frechet_distance(a, b) == pytest.approx(11.0, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(11.0, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_reference():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(300, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(300, 8, generator=gen, dtype=torch.float64) + 0.5
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    s_a, s_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


# ---------------------------------------------------------------- feature networks


def test_fallback_feature_net_is_declared_and_deterministic():
    net = load_frechet_feature_net(None)
    assert isinstance(net, RandomConvFeatureNet)
    assert net.metric_name == "recon_frechet_distance_random_net" != "rfid"
    torch.manual_seed(123)  # the global RNG must not change the fallback's weights
    again = load_frechet_feature_net(None)
    x = _images(3)
    feats = net(x)
    assert feats.shape == (3, net.feature_dim)
    assert torch.equal(feats, again(x))
    # Its distance grows as reconstructions get worse.
    xs = _images(32, seed=3)
    noise = torch.randn(xs.shape, generator=torch.Generator().manual_seed(4))
    dists = [frechet_distance(net(xs), net((xs + s * noise).clamp(0, 1))) for s in (0.0, 0.05, 0.3)]
    assert dists[0] == pytest.approx(0.0, abs=1e-6) and dists[0] < dists[1] < dists[2]


def test_inception_feature_net_loads_from_a_local_state_dict(tmp_path):
    from torchvision.models import inception_v3

    reference = inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    path = tmp_path / "inception_v3.pt"
    torch.save(reference.state_dict(), path)

    net = load_frechet_feature_net(str(path))
    assert isinstance(net, InceptionFeatureNet)
    assert net.metric_name == "rfid"
    x = _images(1)  # one image: a 299 px Inception forward is the slow part on a CPU
    feats = net(x)
    assert feats.shape == (1, 2048)
    # The weights really came from the file: same pool features as the saved model's own trunk.
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = reference(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1)
    torch.testing.assert_close(feats, expected)

    bad = tmp_path / "not_inception.pt"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(RuntimeError):
        load_frechet_feature_net(str(bad))


# ---------------------------------------------------------------- retrieval and zero-shot


def test_matching_embeddings_give_recall_one():
    emb = F.normalize(torch.randn(12, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = retrieval_recall(emb, emb.clone())
    assert out == {"i2t_recall_at_1": 1.0, "i2t_recall_at_5": 1.0, "t2i_recall_at_1": 1.0, "t2i_recall_at_5": 1.0}


def test_shuffled_captions_give_the_right_lower_recall():
    # Text i = normalize(e_perm[i] + 0.5 e_i). For an image that is not a fixed point of perm, its own
    # caption scores 0.5 but one other caption scores 1: it is ranked second. Both directions alike.
    n = 10
    perm = torch.tensor([0, 1, 2, 3, 5, 4, 7, 6, 9, 8])  # 4 fixed points
    e = torch.eye(n)
    text = F.normalize(e[perm] + 0.5 * e, dim=-1)
    out = retrieval_recall(e, text, ks=(1, 2, 5))
    for direction in ("i2t", "t2i"):
        assert out[f"{direction}_recall_at_1"] == pytest.approx(0.4)
        assert out[f"{direction}_recall_at_2"] == 1.0
        assert out[f"{direction}_recall_at_5"] == 1.0


def test_recall_counts_ties_against_the_match():
    collapsed = torch.ones(8, 4) / 2  # every image and caption embeds to the same vector
    out = retrieval_recall(collapsed, collapsed, ks=(1, 5, 8))
    assert out["i2t_recall_at_1"] == 0.0 and out["i2t_recall_at_5"] == 0.0
    assert out["i2t_recall_at_8"] == 1.0  # 7 tied wrong candidates: rank 7 < 8


def test_recall_agrees_with_sorting_on_random_embeddings():
    gen = torch.Generator().manual_seed(5)
    img, txt = torch.randn(40, 8, generator=gen), torch.randn(40, 8, generator=gen)
    out = retrieval_recall(img, txt, ks=(1, 5, 10))
    sim = img @ txt.T
    for direction, s in (("i2t", sim), ("t2i", sim.T)):
        rank = (s.argsort(dim=1, descending=True) == torch.arange(40)[:, None]).float().argmax(1)
        for k in (1, 5, 10):
            assert out[f"{direction}_recall_at_{k}"] == pytest.approx((rank < k).float().mean().item())


def test_zero_shot_accuracy_on_a_constructed_case():
    classes = torch.eye(4)  # class c's text embedding is e_c
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    # Images 0-5 lie near their own class; images 6 and 7 lie nearer class 0.
    target = torch.tensor([0, 1, 2, 3, 0, 1, 0, 0])
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(classes[target] + 0.1 * torch.rand(8, 4, generator=gen), dim=-1)
    assert zero_shot_accuracy(images, classes, labels) == pytest.approx(6 / 8)


# ---------------------------------------------------------------- answers of the LM


def test_answers_are_scored_by_the_class_words_they_name_first():
    names = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle", "cross")]
    assert parse_answer("The image shows a Red circle, drawn on a plain light background.", names) == ["red", "circle"]
    assert parse_answer("a red square next to a blue circle", names) == ["red", "square"]  # the first named
    assert parse_answer("a reddish circles", names) == [None, None]  # whole words only
    answers = ["The image shows a red circle.", "a blue circle", "a green", "nothing at all"]
    labels = [names.index("red circle"), names.index("red circle"), names.index("green cross"), names.index("yellow cross")]
    result = answer_accuracy(answers, labels, names)
    assert result["class_acc"] == pytest.approx(1 / 4) and result["class_chance"] == pytest.approx(1 / 16)
    assert result["slot_acc"] == pytest.approx([2 / 4, 2 / 4])  # colours: red, green; shapes: circle, circle
    assert result["slot_chance"] == pytest.approx([1 / 4, 1 / 4])
    with pytest.raises(ValueError, match="labels"):
        answer_accuracy(answers[:2], labels, names)


# ---------------------------------------------------------------- codebook usage


def test_codebook_usage_and_perplexity():
    uniform = torch.arange(16).repeat(3).view(3, 2, 2, 4)  # every entry used 3 times
    assert codebook_usage(uniform, 16) == pytest.approx({"codebook_usage": 1.0, "codebook_perplexity": 16.0})
    half = torch.arange(8).repeat(4).view(2, 2, 2, 4)  # 8 of 32 entries, equally often
    assert codebook_usage(half, 32) == pytest.approx({"codebook_usage": 0.25, "codebook_perplexity": 8.0})
    collapsed = torch.full((2, 4, 4, 4), 7)
    assert codebook_usage(collapsed, 64) == pytest.approx({"codebook_usage": 1 / 64, "codebook_perplexity": 1.0})
    with pytest.raises(ValueError):
        codebook_usage(torch.tensor([64]), 64)
    # One codebook per depth: depth 0 uses entries {0, 1}, depth 1 only entry 2 -> averaged.
    per_depth = torch.tensor([[0, 2], [1, 2], [0, 2], [1, 2]])
    assert codebook_usage(per_depth, 4, shared=False) == pytest.approx(
        {"codebook_usage": (2 / 4 + 1 / 4) / 2, "codebook_perplexity": (2.0 + 1.0) / 2}
    )
    assert codebook_usage(per_depth, 4) == pytest.approx({"codebook_usage": 3 / 4, "codebook_perplexity": 2**1.5})


# ---------------------------------------------------------------- evaluate_tower


class _OracleTower(torch.nn.Module):
    """A stand-in with the tower API that is perfect by construction: caption token i embeds to
    image i's embedding, codes decode to the very image they came from."""

    def __init__(self, images, codebook_size=8):
        super().__init__()
        self.register_buffer("images", images)
        self.proj = torch.nn.Linear(images[0].numel(), 16, bias=False)
        self.config = type("Cfg", (), {"codebook_size": codebook_size})()

    def encode_image(self, x):
        return F.normalize(self.proj(x.flatten(1)), dim=-1)

    def encode_text(self, tokens):  # tokens[:, 0] is the index of the image the caption describes
        return self.encode_image(self.images[tokens[:, 0]])

    def encode_codes(self, x):  # code (b, 0, 0, 0) holds the image index; it needs the whole set
        idx = (x.flatten(1)[:, None] == self.images.flatten(1)[None]).all(-1).float().argmax(1)
        codes = torch.zeros(x.shape[0], 2, 2, 4, dtype=torch.long)
        codes[:, 0, 0, 0] = idx
        return codes

    def decode_codes(self, codes):
        return self.images[codes[:, 0, 0, 0]]


def test_evaluate_tower_on_a_perfect_tower():
    images = _images(8)
    tower = _OracleTower(images).train()
    captions = torch.arange(8)[:, None].repeat(1, 5)
    # Class c's prompts (2 templates, ensembled) both describe image c, so image c is class c.
    prompts = torch.arange(8)[:, None, None].repeat(1, 2, 5)
    labels = torch.arange(8)
    metrics = evaluate_tower(tower, images, captions, labels, prompts, frechet_net=None, batch_size=3)
    assert tower.training  # mode restored
    assert metrics["psnr"] == math.inf
    assert metrics["ssim"] == pytest.approx(1.0)
    assert metrics["recon_frechet_distance_random_net"] == pytest.approx(0.0, abs=1e-6)
    assert "rfid" not in metrics
    for key in ("i2t_recall_at_1", "t2i_recall_at_1", "i2t_recall_at_5", "t2i_recall_at_5"):
        assert metrics[key] == 1.0
    assert metrics["zero_shot_acc"] == 1.0
    wrong = evaluate_tower(tower, images, None, labels.roll(1), prompts, batch_size=3)
    assert wrong["zero_shot_acc"] == 0.0 and "i2t_recall_at_1" not in wrong
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["codebook_perplexity"] >= 1


# ---------------------------------------------------------------- evaluate_tower on the real tiny tower


def _tiny_tower():
    from vilau_model.config import get_tower_config
    from vilau_model.vision_tower import UnifiedVisionTower

    torch.manual_seed(0)
    return UnifiedVisionTower(get_tower_config("tiny"))


def test_evaluate_real_tiny_tower():
    tower = _tiny_tower()
    images = _images(8)
    captions = tower.tokenize([f"a photo of scene {i}" for i in range(8)])
    prompts = tower.tokenize(["a photo of a cat", "a photo of a dog", "a photo of a car", "a photo of a tree"])
    labels = torch.arange(8) % 4
    metrics = evaluate_tower(tower, images, captions, labels, prompts, batch_size=5)
    assert tower.training  # restored after evaluation

    expected_keys = {
        "psnr", "ssim", "recon_frechet_distance_random_net", "codebook_usage", "codebook_perplexity", "zero_shot_acc",
        "i2t_recall_at_1", "i2t_recall_at_5", "t2i_recall_at_1", "t2i_recall_at_5",
    }
    assert set(metrics) == expected_keys
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    # Same numbers as the metric functions applied by hand to the tower's outputs.
    with torch.no_grad():
        tower.eval()
        codes = tower.encode_codes(images)
        recon = tower.decode_codes(codes)
        image_emb, text_emb = tower.encode_image(images), tower.encode_text(captions)
        class_emb = tower.encode_text(prompts)
    assert metrics["psnr"] == pytest.approx(psnr(images, recon), rel=1e-5)
    assert metrics["ssim"] == pytest.approx(ssim(images, recon), rel=1e-4, abs=1e-6)
    assert metrics["codebook_usage"] == codebook_usage(codes, tower.config.codebook_size)["codebook_usage"]
    assert metrics["zero_shot_acc"] == zero_shot_accuracy(image_emb, class_emb, labels)
    for key, value in retrieval_recall(image_emb, text_emb).items():
        assert metrics[key] == value


def test_evaluate_tiny_tower_made_perfect():
    """The real tiny tower with an oracle text side (caption i embeds like image i) and an oracle
    decoder (codes decode to the image they came from): every metric is at its best value."""
    tower = _tiny_tower().eval()
    images = _images(8)
    with torch.no_grad():
        codes = tower.encode_codes(images)
    by_codes = {c.numpy().tobytes(): i for i, c in enumerate(codes)}
    assert len(by_codes) == len(images)  # the random tower still gives each image its own codes

    tower.encode_text = lambda tokens: tower.encode_image(images[tokens[:, 0].cpu()])
    tower.decode_codes = lambda c: images[[by_codes[x.numpy().tobytes()] for x in c.cpu()]]
    captions = torch.arange(8)[:, None].repeat(1, tower.config.context_length)
    metrics = evaluate_tower(tower, images, captions, torch.arange(8), captions, batch_size=3)

    assert metrics["psnr"] == math.inf
    assert metrics["ssim"] == pytest.approx(1.0)
    assert metrics["recon_frechet_distance_random_net"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["zero_shot_acc"] == 1.0
    for key in ("i2t_recall_at_1", "i2t_recall_at_5", "t2i_recall_at_1", "t2i_recall_at_5"):
        assert metrics[key] == 1.0


# ---------------------------------------------------------------- evaluate_tower over data-parallel ranks


def _sharded_eval_rank(rank: int, world: int, n_images: int, out: str) -> None:
    """The tiny tower under FSDP2 as the trainer shards it (blocks, decoder, root), each rank
    evaluating its share of the split; every forward call is collective, so uneven shares would hang."""
    from torch.distributed.device_mesh import init_device_mesh

    from orchestration.train.fsdp import mixed_precision, promote_scalar_parameters, shard_model
    from orchestration.train.tower import _all_gather_over
    from vilau_model.encoders import block_lists

    torch.set_num_threads(1)
    tower = _tiny_tower()
    images, captions, labels, prompts = _eval_split(tower, n_images)
    promote_scalar_parameters(tower)
    blocks = [b for blocks in block_lists(tower.clip) for b in blocks] + [tower.decoder]
    tower = shard_model(tower, blocks, init_device_mesh("cpu", (world,)), mixed_precision(torch.device("cpu")))
    tower.unshard()  # as the trainer's eval does: the root's own parameters, gathered for the calls
    metrics = evaluate_tower(tower, images, captions, labels, prompts, batch_size=3,
                             rank=rank, world=world, all_gather=_all_gather_over(torch.device("cpu")))
    torch.save(metrics, f"{out}.rank{rank}")


def _eval_split(tower, n: int):
    images = _images(n, seed=3)
    captions = tower.tokenize([f"a photo of scene {i}" for i in range(n)])
    prompts = tower.tokenize(["a photo of a cat", "a photo of a dog", "a photo of a car"])
    return images, captions, torch.arange(n) % 3, prompts


def test_evaluation_shared_by_two_fsdp_ranks_equals_one_process(tmp_path):
    from gloo_ranks import run_on_gloo_ranks

    n_images = 11  # shares of 6 and 5 (+1 padding) images, in batches of 3: 2 forward calls each
    tower = _tiny_tower()
    expected = evaluate_tower(tower, *_eval_split(tower, n_images), batch_size=3)
    run_on_gloo_ranks(_sharded_eval_rank, 2, n_images, str(tmp_path / "metrics"))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"metrics.rank{rank}")
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (rank, key)


def test_sample_grids_carry_their_labels():
    """Every column of a generation grid is labelled with its prompt and every row named: text is drawn
    above each column and before each row, and the images keep their pixels."""
    import numpy as np

    from orchestration.train.artifacts import image_grid

    rows = [torch.zeros(3, 3, 16, 16), torch.ones(3, 3, 16, 16)]
    plain = np.asarray(image_grid(rows))
    labelled = np.asarray(image_grid(rows, column_labels=['"a photo of a red circle"', '"b"', '"c"'],
                                     row_labels=["sample 1", "sample 2"]))
    assert labelled.shape[0] > plain.shape[0] and labelled.shape[1] > plain.shape[1]
    dark = labelled.min(axis=2) < 128
    cell = 96 + 2
    header = labelled.shape[0] - 2 * cell - 2
    left = labelled.shape[1] - 3 * cell - 2
    for i in range(3):  # text over each column
        assert dark[:header, left + i * cell : left + (i + 1) * cell].any()
    for r in range(2):  # text before each row
        assert dark[header + r * cell : header + (r + 1) * cell, :left].any()
    assert (labelled[header + 2 : header + 96, left + 2 : left + 96] == 0).all()  # the first row's image
