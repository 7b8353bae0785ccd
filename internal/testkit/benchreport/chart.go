// Package benchreport writes the mesh benchmark's results: a Markdown
// report and a PNG bar chart (drawn with the standard library and a bitmap
// font, so that it needs nothing installed).
package benchreport

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"os"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// Bar is one bar of a chart.
type Bar struct {
	Label string
	Value float64
	Note  string // printed after the value, e.g. a ratio
}

// BarChart draws horizontal bars, one per row, scaled to the largest value,
// and writes a PNG to path.
func BarChart(path, title, unit string, bars []Bar) error {
	const (
		width, rowH, top, left, right = 1000, 34, 50, 290, 240
	)
	height := top + rowH*len(bars) + 30
	img := image.NewRGBA(image.Rect(0, 0, width, height))
	draw.Draw(img, img.Bounds(), image.NewUniform(color.White), image.Point{}, draw.Src)
	text := func(x, y int, s string, c color.Color) {
		d := &font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13,
			Dot: fixed.P(x, y)}
		d.DrawString(s)
	}
	text(20, 25, title, color.Black)
	maxV := 0.0
	for _, b := range bars {
		maxV = max(maxV, b.Value)
	}
	palette := []color.RGBA{{0x9e, 0x9e, 0x9e, 0xff}, {0x60, 0x7d, 0x8b, 0xff}, {0x1e, 0x88, 0xe5, 0xff},
		{0x43, 0xa0, 0x47, 0xff}, {0xe5, 0x39, 0x35, 0xff}, {0xfb, 0x8c, 0x00, 0xff}}
	for i, b := range bars {
		y := top + i*rowH
		text(20, y+20, b.Label, color.Black)
		w := 0
		if maxV > 0 {
			w = int(float64(width-left-right) * b.Value / maxV)
		}
		draw.Draw(img, image.Rect(left, y+6, left+w, y+rowH-6), image.NewUniform(palette[i%len(palette)]), image.Point{}, draw.Src)
		text(left+w+8, y+20, fmt.Sprintf("%.0f %s %s", b.Value, unit, b.Note), color.Black)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
