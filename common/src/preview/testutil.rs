//! Test helpers shared by the preview tests: PNG decoding and pixel access.

use super::canvas::Rgb;

/// Decodes PNG bytes to (width, height, RGB bytes).
pub(super) fn decode(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

/// The RGB colour of pixel (x, y) of a decoded image.
pub(super) fn pixel(img: &(usize, usize, Vec<u8>), x: usize, y: usize) -> Rgb {
    let o = (y * img.0 + x) * 3;
    [img.2[o], img.2[o + 1], img.2[o + 2]]
}
