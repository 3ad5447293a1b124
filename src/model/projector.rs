//! `pixel_shuffle` and `mlp1` of `InternVLChatModel.extract_feature`.
use super::nn::{LayerNorm, Linear, Place};
use super::weights::Weights;
use tch::Tensor;

/// `InternVLChatModel.pixel_shuffle`: [n, w, h, c] -> [n, h*s, w*s, c/(s*s)] (v2 transposes back).
pub fn pixel_shuffle(xs: &Tensor, scale: f64, v2: bool) -> Tensor {
    let (n, w, h, c) = xs.size4().expect("pixel_shuffle input is 4-d");
    let hs = (h as f64 * scale) as i64;
    let ws = (w as f64 * scale) as i64;
    let xs = xs
        .view([n, w, hs, (c as f64 / scale) as i64])
        .permute([0, 2, 1, 3])
        .contiguous()
        .view([n, hs, ws, (c as f64 / (scale * scale)) as i64]);
    if v2 {
        xs.permute([0, 2, 1, 3]).contiguous()
    } else {
        xs
    }
}

/// `mlp1`: LayerNorm, Linear, GELU, Linear (checkpoint keys mlp1.0, mlp1.1, mlp1.3).
pub struct Mlp1 {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Mlp1 {
    pub fn load(w: &mut Weights, p: Place, din: i64, dout: i64) -> Self {
        Self {
            norm: LayerNorm::load(w, p, "mlp1.0", din, 1e-5),
            fc1: Linear::load(w, p, "mlp1.1", din, dout, true),
            fc2: Linear::load(w, p, "mlp1.3", dout, dout, true),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.fc1.forward(&self.norm.forward(xs)).gelu("none"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's view/permute sequence, written out on a small tensor by hand.
    #[test]
    fn pixel_shuffle_v2_moves_2x2_neighbourhoods_into_channels() {
        // n=1, w=2, h=2, c=1 with values 0..4 laid out [w][h]
        let xs = Tensor::arange(4, (tch::Kind::Float, tch::Device::Cpu)).view([1, 2, 2, 1]);
        let v2 = pixel_shuffle(&xs, 0.5, true);
        assert_eq!(v2.size(), [1, 1, 1, 4]);
        let got: Vec<f32> = Vec::try_from(v2.flatten(0, -1)).unwrap();
        // view [1,2,1,2] -> permute -> [1,1,2,2] -> view [1,1,1,4]: values in w-major order
        assert_eq!(got, vec![0.0, 1.0, 2.0, 3.0]);
        let xs = Tensor::arange(16, (tch::Kind::Float, tch::Device::Cpu)).view([1, 2, 2, 4]);
        let v1: Vec<f32> = Vec::try_from(pixel_shuffle(&xs, 0.5, false).flatten(0, -1)).unwrap();
        let v2: Vec<f32> = Vec::try_from(pixel_shuffle(&xs, 0.5, true).flatten(0, -1)).unwrap();
        assert_eq!(v1.len(), 16);
        assert_eq!(
            v1, v2,
            "with a 1x1 output grid the final transpose is a no-op"
        );
        let xs = Tensor::arange(16, (tch::Kind::Float, tch::Device::Cpu)).view([1, 4, 4, 1]);
        let a: Vec<f32> = Vec::try_from(pixel_shuffle(&xs, 0.5, false).flatten(0, -1)).unwrap();
        let b: Vec<f32> = Vec::try_from(pixel_shuffle(&xs, 0.5, true).flatten(0, -1)).unwrap();
        // v1 keeps the transposed grid: the (0,1) and (1,0) cells swap
        assert_eq!(&a[0..4], &b[0..4]);
        assert_eq!(&a[4..8], &b[8..12]);
        assert_eq!(&b[0..4], &[0.0, 1.0, 4.0, 5.0]);
    }
}
