"""Rules: per-module domain weights W[M, K] from the Gram G[M, K, K]; the combined gradient of module m is
sum_k W[m, k] g_k. Every rule is vectorised over modules and runs in fp64 on the tiny Gram (W is returned in
G's dtype). Randomness is a pure function of (seed, step, module key, domain pair): every rank that holds the
same all-reduced Gram gets the same W, whatever its parallel layout.

Registry: `get_rule(name, **cfg)`; `register_rule(name, cls)` for user rules. A rule object has
`weights(G, module_keys, step, domains=None) -> W`, `state_dict()`, `load_state_dict(sd)`.
"""
from __future__ import annotations

import inspect
from typing import Dict, Optional, Sequence

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Integer hash of int64 values in [0, 2^32) (Wellons' 'lowbias32'-style); products stay below 2^63."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def domain_orders(seed: int, step: int, module_keys: torch.Tensor, K: int) -> torch.Tensor:
    """order[m, i, :] = random order of the other domains j != i for module m: LongTensor [M, K, K-1].

    Counter-based: a hash of (seed, step, module key, i, j) per entry, argsorted along j. No generators, no
    dependence on the module's position in any list.
    """
    keys = module_keys.to(torch.int64).cpu()
    M = keys.numel()
    t = lambda v: torch.tensor(v & _M32, dtype=torch.int64, device="cpu")  # noqa: E731
    h = _mix32(_mix32(t(seed) ^ _mix32(t(seed >> 32))) ^ t(step))
    h = _mix32(h ^ _mix32(t(step >> 32)))
    h = _mix32(h ^ (keys & _M32)).view(M, 1, 1)
    h = _mix32(h ^ ((keys >> 32) & _M32).view(M, 1, 1))
    i = torch.arange(K, dtype=torch.int64, device="cpu")
    h = _mix32(h ^ (i.view(1, K, 1) * 1024 + i.view(1, 1, K) + 0x9E3779B9) & _M32)
    h = torch.where(torch.eye(K, dtype=torch.bool, device="cpu").view(1, K, K), torch.full_like(h, 1 << 40), h)
    return torch.sort(h, dim=-1, stable=True).indices[..., : K - 1]


class Rule:
    name = "rule"

    def weights(self, G: torch.Tensor, module_keys: torch.Tensor, step: int,
                domains: Optional[Sequence[str]] = None) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SumRule(Rule):
    """Mixed RL: W = 1."""
    name = "sum"

    def __init__(self, seed: int = 0):
        pass

    def weights(self, G, module_keys, step, domains=None):
        return torch.ones(G.shape[0], G.shape[1], dtype=G.dtype, device=G.device)


class PCGradRule(Rule):
    """PCGrad per module in Gram form (the reference per-tensor loop without building a projected gradient):
    a_i starts at e_i; for j in a random order of the other domains, if <a_i g, g_j> < 0 and |g_j|^2 > eps, remove
    the component along the *original* g_j; W = sum_i a_i.
    """
    name = "pcgrad"

    def __init__(self, seed: int = 0, eps: float = 0.0):
        self.seed, self.eps = int(seed), float(eps)

    def projections(self, G, module_keys, step) -> torch.Tensor:
        """A[m, i, :] = coefficients of domain i's projected gradient (fp64, CPU); weights = A.sum(1)."""
        M, K = G.shape[0], G.shape[1]
        g = G.detach().to(torch.float64).cpu()
        order = domain_orders(self.seed, step, module_keys, K)
        diag = g.diagonal(dim1=1, dim2=2)
        A = torch.eye(K, dtype=torch.float64, device="cpu").repeat(M, 1, 1)  # A[m, i] = coefficients of projected g_i
        for t in range(K - 1):
            j = order[:, :, t]  # [M, K]
            d = torch.bmm(A, g).gather(2, j.unsqueeze(2)).squeeze(2)  # <a_i g, g_j>
            gjj = diag.gather(1, j)
            ok = (d < 0) & (gjj > self.eps)
            coef = torch.where(ok, d / torch.where(ok, gjj, torch.ones_like(gjj)), torch.zeros_like(d))
            A.scatter_add_(2, j.unsqueeze(2), -coef.unsqueeze(2))
        return A

    def weights(self, G, module_keys, step, domains=None):
        M, K = G.shape[0], G.shape[1]
        if K <= 1:
            return torch.ones(M, K, dtype=G.dtype, device=G.device)
        return self.projections(G, module_keys, step).sum(1).to(device=G.device, dtype=G.dtype)


class GradVacRule(Rule):
    """Gradient Vaccine (Wang et al., ICLR 2021), per module, in Gram form, as in LibMTL's per-layer-group
    implementation: for j in a random order of the other domains, with rho = cos(a_i g, g_j) and the EMA target
    rho_T[m, i, j]: if rho < rho_T, a_i[j] += |a_i g| (rho_T sqrt(1-rho^2) - rho sqrt(1-rho_T^2)) /
    (|g_j| sqrt(1-rho_T^2)); then rho_T <- (1-beta) rho_T + beta rho. W = sum_i a_i.

    State: rho_T per (module key, domain i, domain j), keyed by stable module keys and domain names so it
    survives a change of K (a domain missing this step) and a different parallel layout. Checkpoint it with
    state_dict()/load_state_dict().
    """
    name = "gradvac"

    def __init__(self, seed: int = 0, eps: float = 0.0, beta: float = 0.01):
        self.seed, self.eps, self.beta = int(seed), float(eps), float(beta)
        self._keys = torch.zeros(0, dtype=torch.int64, device="cpu")  # sorted module keys
        self._domains: list = []
        self._rho = torch.zeros(0, 0, 0, dtype=torch.float64, device="cpu")

    def _rows(self, keys: torch.Tensor, domains: Sequence[str]):
        """Indices of (modules, domains) in the state, growing it for new ones (new targets start at 0)."""
        new_d = [d for d in domains if d not in self._domains]
        new_k = keys[~torch.isin(keys, self._keys)].unique()
        if new_d or new_k.numel():
            D0, D1 = len(self._domains), len(self._domains) + len(new_d)
            allk = torch.cat([self._keys, new_k]).unique()  # sorted
            rho = torch.zeros(allk.numel(), D1, D1, dtype=torch.float64, device="cpu")
            if self._keys.numel():
                rho[torch.searchsorted(allk, self._keys), :D0, :D0] = self._rho
            self._keys, self._domains, self._rho = allk, self._domains + new_d, rho
        rows = torch.searchsorted(self._keys, keys)
        cols = torch.tensor([self._domains.index(d) for d in domains], dtype=torch.int64, device="cpu")
        return rows, cols

    def weights(self, G, module_keys, step, domains=None):
        M, K = G.shape[0], G.shape[1]
        if K <= 1:
            return torch.ones(M, K, dtype=G.dtype, device=G.device)
        domains = [str(d) for d in (domains if domains is not None else range(K))]
        keys = module_keys.to(torch.int64).cpu()
        rows, cols = self._rows(keys, domains)
        target = self._rho[rows][:, cols][:, :, cols]  # [M, K, K]
        g = G.detach().to(torch.float64).cpu()
        order = domain_orders(self.seed, step, keys, K)
        gn = g.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # |g_j|
        A = torch.eye(K, dtype=torch.float64, device="cpu").repeat(M, 1, 1)
        seen = torch.zeros(M, K, K, dtype=torch.float64, device="cpu")
        valid = torch.zeros(M, K, K, dtype=torch.bool, device="cpu")
        for t in range(K - 1):
            j = order[:, :, t].unsqueeze(2)
            AG = torch.bmm(A, g)
            d = AG.gather(2, j).squeeze(2)
            an = (AG * A).sum(2).clamp_min(0).sqrt()  # |a_i g|
            gj = gn.gather(1, j.squeeze(2))
            ok = (an > 0) & (gj * gj > self.eps) & (gj > 0)
            rho = torch.where(ok, d / torch.where(ok, an * gj, torch.ones_like(an)), torch.zeros_like(d))
            rho = rho.clamp(-1.0, 1.0)
            tgt = target.gather(2, j).squeeze(2)
            s_t = (1 - tgt * tgt).clamp_min(1e-12).sqrt()
            upd = an * (tgt * (1 - rho * rho).clamp_min(0).sqrt() - rho * s_t) / (torch.where(ok, gj, 1.0) * s_t)
            A.scatter_add_(2, j, torch.where(ok & (rho < tgt), upd, torch.zeros_like(upd)).unsqueeze(2))
            seen.scatter_(2, j, rho.unsqueeze(2))
            valid.scatter_(2, j, ok.unsqueeze(2))
        new = torch.where(valid, (1 - self.beta) * target + self.beta * seen, target)
        r, c = rows.view(M, 1, 1), cols.view(1, K, 1)
        self._rho[r, c, cols.view(1, 1, K)] = new
        return A.sum(1).to(device=G.device, dtype=G.dtype)

    def state_dict(self) -> dict:
        return {"module_keys": self._keys.clone(), "domains": list(self._domains), "rho": self._rho.clone(),
                "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self._keys = state["module_keys"].to(torch.int64).cpu().clone()
        self._domains = list(state["domains"])
        self._rho = state["rho"].to(torch.float64).cpu().clone()
        if self._rho.shape != (self._keys.numel(), len(self._domains), len(self._domains)):
            raise ValueError(f"gradvac state: rho shape {tuple(self._rho.shape)} does not match "
                             f"{self._keys.numel()} modules x {len(self._domains)} domains")


RULES: Dict[str, type] = {"sum": SumRule, "pcgrad": PCGradRule, "gradvac": GradVacRule}


def register_rule(name: str, cls: type) -> None:
    """Add a rule class under `name`; a name registered twice is an error (it would silently replace a rule)."""
    if name in RULES:
        raise ValueError(f"surgery rule {name!r} is already registered ({RULES[name].__name__})")
    RULES[name] = cls


def get_rule(name: str, **cfg) -> Rule:
    """Rule `name` configured with `cfg`; unknown names and options raise ValueError naming them."""
    if name not in RULES:
        raise ValueError(f"unknown surgery rule {name!r}; expected one of {sorted(RULES)}")
    accepted = rule_options(name)
    bad = sorted(set(cfg) - accepted)
    if bad:
        raise ValueError(f"surgery rule {name!r} has no option(s) {bad}; it accepts {sorted(accepted)}")
    return RULES[name](**cfg)


def rule_options(name: str) -> set:
    """Names of the keyword options that rule `name`'s constructor accepts."""
    params = inspect.signature(RULES[name].__init__).parameters
    return {p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD}
