//! Per-layer key/value cache: buffers of shape [b, kv_heads, capacity, head_dim] that grow
//! geometrically, so decoding appends in place instead of re-allocating every token, up to a
//! limit (the context window) that doubling never overshoots.
use tch::Tensor;

#[derive(Default)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: i64,
    /// Most positions a buffer grows to by doubling (0: no limit); a single append beyond it
    /// still gets the room it needs.
    limit: i64,
}

impl LayerCache {
    /// Appends `k`, `v` [b, h, q, d] and returns views over everything cached so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let q = k.size()[2];
        let need = self.len + q;
        self.reserve(need, &k.size(), k.kind(), k.device());
        let kb = self.k.as_ref().expect("allocated by reserve");
        let vb = self.v.as_ref().expect("allocated by reserve");
        kb.narrow(2, self.len, q).copy_(k);
        vb.narrow(2, self.len, q).copy_(v);
        self.len = need;
        (kb.narrow(2, 0, need), vb.narrow(2, 0, need))
    }

    /// Room for `need` positions in buffers shaped like `like` ([b, h, _, d]): they grow
    /// geometrically (at least 64 positions, doubling, never past the limit unless one append
    /// needs it), keeping what they hold.
    fn reserve(&mut self, need: i64, like: &[i64], kind: tch::Kind, dev: tch::Device) {
        let cap = self.capacity();
        if need <= cap {
            return;
        }
        let mut new_cap = need.max(cap * 2).max(64);
        if self.limit > 0 {
            new_cap = new_cap.min(self.limit).max(need);
        }
        let mut shape = like.to_vec();
        shape[2] = new_cap;
        let grow = |old: &Option<Tensor>| {
            let buf = Tensor::zeros(&shape, (kind, dev));
            if let Some(old) = old {
                buf.narrow(2, 0, self.len)
                    .copy_(&old.narrow(2, 0, self.len));
            }
            buf
        };
        self.k = Some(grow(&self.k));
        self.v = Some(grow(&self.v));
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    /// Room for one more position of `b` rows, `kv_heads` heads of `head_dim` values in `kind`
    /// (bf16), taken: where the caller writes this step's key and value (the native decoding
    /// step). Buffers grow as [`LayerCache::append`]'s do ([`LayerCache::reserve`]), the only
    /// libtorch calls here.
    pub fn append_slot(
        &mut self,
        b: i64,
        kv_heads: i64,
        head_dim: i64,
        kind: tch::Kind,
    ) -> super::native::Slot {
        self.reserve(
            self.len + 1,
            &[b, kv_heads, 0, head_dim],
            kind,
            tch::Device::Cpu,
        );
        let (k, v) = (
            self.k.as_ref().expect("allocated by reserve"),
            self.v.as_ref().expect("allocated by reserve"),
        );
        debug_assert!(k.is_contiguous() && v.is_contiguous());
        let pos = self.len;
        self.len += 1;
        super::native::Slot {
            k: k.data_ptr() as *mut u16,
            v: v.data_ptr() as *mut u16,
            cap: k.size()[2] as usize,
            pos: pos as usize,
            len: self.len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.k.as_ref().map(|t| t.size()[2]).unwrap_or(0)
    }

    /// Forgets everything after the first `len` positions (keeps the buffers).
    pub fn truncate(&mut self, len: i64) {
        self.len = self.len.min(len);
    }
}

/// The cache of every decoder layer of one conversation (or one batch).
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// The dynamic rope's state for this sequence (see [`super::rope::RopeState`]).
    pub rope: super::rope::RopeState,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerCache::default()).collect(),
            ..Self::default()
        }
    }

    /// Cached positions (the same in every layer).
    pub fn len(&self) -> i64 {
        self.layers.first().map(|l| l.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `len` positions. The next forward pass continues as a fresh sequence
    /// would: the rope state starts over (a kept prefix is one the rope never grew for; see
    /// `Engine::run`'s reuse rule).
    pub fn truncate(&mut self, len: i64) {
        for l in &mut self.layers {
            l.truncate(len);
        }
        self.rope = None;
    }

    /// Positions every layer's buffers may grow to by doubling (the context window).
    pub fn set_limit(&mut self, positions: usize) {
        for l in &mut self.layers {
            l.limit = positions as i64;
        }
    }

    /// Positions the buffers have room for (the same in every layer).
    pub fn capacity(&self) -> i64 {
        self.layers.first().map(|l| l.capacity()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn appends_grow_geometrically_and_keep_contents() {
        let mut c = LayerCache::default();
        let mut all = Vec::new();
        let mut caps = Vec::new();
        for step in 0..100 {
            let q = if step == 0 { 5 } else { 1 };
            let k = Tensor::randn([1, 2, q, 4], (Kind::Float, Device::Cpu));
            let v = &k * 2.0;
            let (ka, va) = c.append(&k, &v);
            all.push(k);
            let expect = Tensor::cat(&all, 2);
            assert!(ka.equal(&expect));
            assert!(va.equal(&(expect * 2.0)));
            caps.push(c.capacity());
        }
        assert_eq!(c.len(), 104);
        caps.dedup();
        assert_eq!(caps, vec![64, 128], "no per-token re-allocation");
        c.truncate(10);
        assert_eq!(c.len(), 10);
        let k = Tensor::ones([1, 2, 1, 4], (Kind::Float, Device::Cpu));
        let (ka, _) = c.append(&k, &k);
        assert_eq!(ka.size(), [1, 2, 11, 4]);
        assert!(ka
            .narrow(2, 0, 10)
            .equal(&Tensor::cat(&all, 2).narrow(2, 0, 10)));
    }

    #[test]
    fn growth_stops_at_the_limit() {
        let mut c = KvCache::new(2);
        c.set_limit(100);
        let step = |c: &mut KvCache, q: i64| {
            let k = Tensor::zeros([1, 1, q, 2], (Kind::Float, Device::Cpu));
            for l in &mut c.layers {
                let _ = l.append(&k, &k);
            }
        };
        step(&mut c, 70);
        assert_eq!(c.capacity(), 70);
        step(&mut c, 1); // doubling would give 140
        assert_eq!((c.len(), c.capacity()), (71, 100));
        step(&mut c, 29);
        assert_eq!((c.len(), c.capacity()), (100, 100));
    }
}
