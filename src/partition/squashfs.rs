//! squashfs partition images through backhand.
